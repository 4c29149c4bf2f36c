"""Calibration data for the outlier and low-rank codecs: statistics, selection, and the file format.

Statistics of one row-parallel layer, one row per source: ranks 0..world-1 and, last, the full
(reduced) sum:
* per-channel minimum and maximum of the partial sums, `[world + 1, hidden]` (outlier codecs);
* a sketch of the partial sums' leading directions, `[world + 1, directions, hidden]` (low-rank
  codecs; `tpcomp-calibrate --directions`, default SKETCH_ROWS, up to MAX_RANK): `sketch_rows`
  keeps, per source, the top right singular vectors (scaled by their singular values) of all
  rows seen so far, each row first normalized to unit length, so every
  token counts alike whatever its magnitude (a block codec's error is relative to its own row).
  A codec of rank K uses the first K directions (`Calibration.basis`).

File format (`*.safetensors`), for each layer name L (e.g. `decoder.layers.3.mlp.linear_fc2`):
    `L.min`, `L.max`: float32 `[world + 1, hidden]`; `L.channels`: int64 `[k]` (ascending);
    version 2: `L.basis`: float32 `[world + 1, directions, hidden]`, orthonormal rows per source,
    leading direction first (the same number of directions in every layer).
The safetensors metadata holds one key, `tpcomp_calibration`, a JSON object:
    {"version": 2, "model": str, "tp_size": int, "hidden": int, "ratio": int, "rule": str,
     "layers": [str, ...], "tokens": int, "text": str}
Version 1 files (no bases) still load; a low-rank codec then asks for a new calibration.
Loading checks a file against the model and TP size it is used with and names any mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

FORMAT_KEY = "tpcomp_calibration"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SKETCH_ROWS = 64
"""Directions kept per source by default: the largest low-rank codec rank a calibration file
serves (`tpcomp-calibrate --directions`, up to `codecs.spec.MAX_RANK`)."""
LEVELS = 15  # 4-bit unsigned codes
STAT_LIMIT = 1e18
"""Largest magnitude a min/max statistic may have. Partial sums beyond it square past float32's
range in the next norm (the codec's output turns into Inf, NaN or zeros downstream), and near
bf16's own limit the codec's step overflows: no working model produces them."""
ORTHONORMAL_TOL = 1e-3
"""How far a stored basis's Gram matrix may lie from the identity (per entry): float32 storage of
an orthonormal basis is off by ~1e-6; a scaled or non-orthogonal basis is off by far more."""
RULES = ("range_sum", "absmax_max", "range_sq_sum")


def select_outlier_channels(ch_min: torch.Tensor, ch_max: torch.Tensor, k: int, rule: str = "range_sum") -> torch.Tensor:
    """Pick k outlier channels from per-source statistics `[sources, hidden]`.

    * `range_sum` (arXiv 2411.07942): the largest range (max - min) summed over the ranks' partial
      sums (the reduced-sum row, last, is left out: the quantizers see partial sums).
    * `absmax_max`: the largest absolute value any rank's partial sum reached. It targets what
      dominates 4-bit error (the per-channel step grows with the range of the worst rank), where
      the sum favours channels that are merely wide on every rank.
    * `range_sq_sum`: the largest sum over ranks of the squared range. A channel's 4-bit step on
      rank r is range_r / 15, so its rounding noise in the reduced sum has variance proportional
      to sum_r range_r**2: taking the top k by that removes the most noise energy (MSE-optimal
      greedy choice for the static codec), where `range_sum` weighs ranks linearly.
    Ties break towards the lower channel index, so the selection is deterministic.
    """
    if ch_min.shape != ch_max.shape or ch_min.dim() != 2:
        raise ValueError(f"statistics must be two [sources, hidden] tensors, got {tuple(ch_min.shape)} and {tuple(ch_max.shape)}")
    hidden = ch_min.shape[1]
    if not 0 < k <= hidden:
        raise ValueError(f"cannot select {k} outlier channels out of {hidden}")
    ranks = slice(0, max(ch_min.shape[0] - 1, 1))
    lo, hi = ch_min[ranks].double(), ch_max[ranks].double()
    if rule == "range_sum":
        score = (hi - lo).sum(0)
    elif rule == "absmax_max":
        score = torch.maximum(hi.abs(), lo.abs()).amax(0)
    elif rule == "range_sq_sum":
        score = (hi - lo).square().sum(0)
    else:
        raise ValueError(f"unknown outlier selection rule {rule!r}; valid: {list(RULES)}")
    # Stable descending sort: equal scores keep ascending channel order.
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:k].sort().values.to(torch.int64)


def sketch_rows(sketch: torch.Tensor | None, rows: torch.Tensor, keep: int = SKETCH_ROWS) -> torch.Tensor:
    """Fold `rows` `[sources, n, hidden]` into a running sketch `[sources, <= keep, hidden]`
    (None: empty): the top `keep` right singular vectors, times their singular values, of the
    sketch stacked on the rows normalized to unit length (zero rows stay zero). While fewer than
    `keep` directions have been seen it is exact; then it keeps the leading subspace."""
    if rows.dim() != 3:
        raise ValueError(f"rows must be [sources, n, hidden], got {tuple(rows.shape)}")
    r = rows.detach().double().cpu()
    if not torch.isfinite(r).all():
        raise ValueError("non-finite partial sums: the model or its inputs are broken")
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    if sketch is not None and (sketch.shape[0] != r.shape[0] or sketch.shape[2] != r.shape[2]):
        raise ValueError(f"rows {tuple(rows.shape)} do not match the sketch {tuple(sketch.shape)}")
    out = None if sketch is None else sketch.double()
    # `keep` rows at a time, through the small Gram matrix: with m m^T = U diag(s^2) U^T, the top
    # rows of U^T m are s_i v_i (the SVD of m, never computed: an SVD of a window's 512 x 640 rows
    # took 7 s on 2 cores, this takes milliseconds).
    for chunk in r.split(keep, dim=1):
        m = chunk if out is None else torch.cat([out, chunk], dim=1)
        _, u = torch.linalg.eigh(m @ m.transpose(1, 2))  # ascending eigenvalues
        out = u[..., -keep:].flip(-1).transpose(1, 2) @ m
    return out.float()


def sketch_basis(sketch: torch.Tensor, directions: int = SKETCH_ROWS) -> torch.Tensor:
    """A sketch -> orthonormal directions `[sources, directions, hidden]`, leading first; a
    source that saw fewer directions is completed with zero rows (which project to nothing)."""
    _, _, vh = torch.linalg.svd(sketch.double(), full_matrices=False)
    out = torch.zeros(sketch.shape[0], directions, sketch.shape[2], dtype=torch.float32)
    n = min(directions, vh.shape[1])
    rank = torch.linalg.matrix_rank(sketch.double())
    for s in range(sketch.shape[0]):
        k = min(n, int(rank[s]))
        out[s, :k] = vh[s, :k].float()
    return out


@dataclass(frozen=True)
class OutlierParams:
    """Static codec parameters of one layer (derived from its statistics)."""

    channels: torch.Tensor  # int64 [k], ascending
    lo: torch.Tensor  # float32 [sources, hidden], bf16-representable
    step: torch.Tensor  # float32 [sources, hidden], bf16-representable, >= 0
    inv_step: torch.Tensor = field(init=False)  # float32, 1/step (0 where step == 0)

    def __post_init__(self) -> None:
        inv = torch.where(self.step > 0, 1.0 / self.step, torch.zeros_like(self.step))
        object.__setattr__(self, "inv_step", inv)

    @property
    def hidden(self) -> int:
        return self.lo.shape[1]

    @classmethod
    def from_stats(cls, ch_min: torch.Tensor, ch_max: torch.Tensor, channels: torch.Tensor) -> "OutlierParams":
        lo = ch_min.float().to(torch.bfloat16).float()
        # Step from the bf16 low end so the calibrated max is reachable; rounded up to bf16 so
        # 15 steps always cover it (up to the bf16 rounding of lo).
        step = ((ch_max.float() - lo) / LEVELS).clamp(min=0)
        step_b = step.to(torch.bfloat16).float()
        step_b = torch.where(step_b < step, torch.nextafter(step_b.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16)).float(), step_b)
        return cls(channels=channels.to(torch.int64), lo=lo, step=step_b)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """A loaded calibration file: per-layer statistics and selected channels."""

    meta: dict
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    channels: dict[str, torch.Tensor]
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per layer, `[world + 1, directions, hidden]` orthonormal directions (version 2 files)."""

    def digest(self) -> str:
        """Short hash of the statistics and selections, to check that all ranks use the same."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True, default=str).encode())
        for name in sorted(set(self.stats) | set(self.bases)):  # a recipe's low-rank layers have bases alone
            own = (*self.stats[name], self.channels[name]) if name in self.stats else ()
            extra = (self.bases[name],) if name in self.bases else ()
            for t in (*own, *extra):
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def params(self, layer: str) -> OutlierParams:
        if layer not in self.channels:
            raise ValueError(f"calibration has no entry for layer {layer!r}; it covers {sorted(self.channels)[:4]}...")
        lo, hi = self.stats[layer]
        return OutlierParams.from_stats(lo, hi, self.channels[layer])

    def label(self) -> str:
        """What the quality records name as the calibration: text, how it was collected, TP."""
        m = self.meta
        return f"{m['text']} ({m.get('source', 'simulated')} TP={m['tp_size']})"

    def basis(self, layer: str, rank: int) -> torch.Tensor:
        """The first `rank` directions of every source of `layer`, `[world + 1, rank, hidden]`."""
        if not self.bases:
            raise ValueError("this calibration file has no low-rank bases (made before format version 2): "
                             "re-run tools/calibrate.py to use a lowrank+ codec")
        if layer not in self.bases:
            raise ValueError(f"calibration has no bases for layer {layer!r}; it covers {sorted(self.bases)[:4]}...")
        if not 1 <= rank <= self.bases[layer].shape[1]:
            raise ValueError(f"low-rank rank {rank}: the calibration file holds {self.bases[layer].shape[1]} directions per "
                             "source; re-run tpcomp-calibrate with --directions >= the rank")
        return self.bases[layer][:, :rank].contiguous()

    def reselect(self, *, ratio: int | None = None, rule: str | None = None) -> "Calibration":
        """The same statistics with the channels chosen for another ratio (one channel in `ratio`)
        and/or rule (`RULES`); None keeps the file's."""
        ratio = self.meta.get("ratio", 64) if ratio is None else ratio
        rule = self.meta.get("rule", "range_sum") if rule is None else rule
        if (ratio, rule) == (self.meta.get("ratio"), self.meta.get("rule")):
            return self
        if rule not in RULES:
            raise ValueError(f"unknown outlier selection rule {rule!r}; valid: {list(RULES)}")
        if not isinstance(ratio, int) or ratio < 2:
            raise ValueError(f"outlier ratio {ratio!r} must be an integer >= 2")
        k = -(-self.meta["hidden"] // ratio)
        channels = {n: select_outlier_channels(lo, hi, k, rule) for n, (lo, hi) in self.stats.items()}
        return Calibration(meta={**self.meta, "ratio": ratio, "rule": rule}, stats=self.stats, channels=channels,
                           bases=self.bases)

    def check_matches(self, *, tp_size: int, hidden: int, model: str | None = None) -> None:
        m = self.meta
        problems = []
        if m["tp_size"] != tp_size:
            problems.append(f"it was made at TP={m['tp_size']}, the model runs at TP={tp_size}")
        if m["hidden"] != hidden:
            problems.append(f"its hidden size is {m['hidden']}, the model's is {hidden}")
        if model is not None and m.get("model") and m["model"] != model:
            problems.append(f"it was made for model {m['model']!r}, not {model!r}")
        if problems:
            raise ValueError("calibration file does not match: " + "; ".join(problems) + ". Re-run tools/calibrate.py for this model and TP size.")


def save_calibration(path: str, cal: Calibration) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, (lo, hi) in cal.stats.items():
        tensors[f"{name}.min"] = lo.float().contiguous()
        tensors[f"{name}.max"] = hi.float().contiguous()
        tensors[f"{name}.channels"] = cal.channels[name].to(torch.int64).contiguous()
        if name in cal.bases:
            tensors[f"{name}.basis"] = cal.bases[name].float().contiguous()
    meta = {**cal.meta, "version": VERSION, "layers": sorted(cal.stats)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={FORMAT_KEY: json.dumps(meta)})
    os.replace(tmp, path)  # never leave a half-written calibration file behind


def load_calibration(path: str) -> Calibration:
    """Read and validate a calibration file: every problem names the file and, where it lies in
    one, the layer (a bad file must fail here, not turn compression off or into NaNs later)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = _read_meta(path, tagged_metadata(path, f.metadata(), FORMAT_KEY, "calibration file"))
            stats, channels, bases = {}, {}, {}
            keys = set(f.keys())
            for name in meta["layers"]:
                missing = [f"{name}.{k}" for k in ("min", "max", "channels") if f"{name}.{k}" not in keys]
                if missing:
                    raise ValueError(f"{path}: layer {name!r} lacks the tensors {missing}")
                stats[name] = (f.get_tensor(f"{name}.min"), f.get_tensor(f"{name}.max"))
                channels[name] = f.get_tensor(f"{name}.channels")
                if f"{name}.basis" in keys:
                    bases[name] = f.get_tensor(f"{name}.basis")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read the calibration file {path}: {e}") from e
    for name in meta["layers"]:
        _check_layer(path, name, meta, stats[name], channels[name], bases.get(name))
    return Calibration(meta=meta, stats=stats, channels=channels, bases=bases)


def tagged_metadata(path: str, metadata: dict | None, key: str, what: str) -> dict:
    """The JSON object a tpcomp safetensors file keeps under metadata `key` (`what`: the file's
    kind, for messages); JSON only, never code."""
    raw = (metadata or {}).get(key)
    if raw is None:
        raise ValueError(f"{path} is not a tpcomp {what} (no {key!r} metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested past Python's limit
        raise ValueError(f"{path}: its {key!r} metadata is not JSON we read ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its {key!r} metadata is not a JSON object")
    return meta


def _read_meta(path: str, meta: dict) -> dict:
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: calibration format version {meta.get('version')} is not one of {READABLE_VERSIONS}")
    for key, kind in (("layers", list), ("tp_size", int), ("hidden", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"{path}: its metadata lacks {key!r} (a {kind.__name__}); re-run tpcomp-calibrate")
    if meta["tp_size"] < 1 or meta["hidden"] < 1 or not all(isinstance(n, str) for n in meta["layers"]):
        raise ValueError(f"{path}: metadata tp_size {meta['tp_size']}, hidden {meta['hidden']} or layer names are invalid")
    return meta


def _check_layer(path: str, name: str, meta: dict, stats: tuple | None, channels: torch.Tensor,
                 basis: torch.Tensor | None) -> None:
    """One layer's tensors: shapes that match the metadata, finite statistics in a range the codec
    can represent, channels that are distinct indices below the hidden size, orthonormal bases
    (`stats` None: a recipe's low-rank layer, which has a basis alone)."""
    sources, hidden = meta["tp_size"] + 1, meta["hidden"]  # every rank's partial sum, and the reduced one
    where = f"{path}, layer {name!r}"
    _check_basis(where, sources, hidden, basis)
    if stats is None:
        return
    lo, hi = stats
    for what, t in (("min", lo), ("max", hi)):
        if tuple(t.shape) != (sources, hidden):
            raise ValueError(f"{where}: {what} statistics have shape {tuple(t.shape)}, expected "
                             f"[{sources}, {hidden}] (TP={meta['tp_size']} ranks + the reduced sum, hidden {hidden})")
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {what} statistics hold NaN or Inf")
        if t.numel() and float(t.abs().max()) > STAT_LIMIT:
            raise ValueError(f"{where}: {what} statistics reach {float(t.abs().max()):.3g}, beyond +-{STAT_LIMIT:g}: "
                             "the codec's step and the norms after it cannot represent that range; re-run "
                             "tpcomp-calibrate on a working model")
    if (lo > hi).any():
        raise ValueError(f"{where}: some channel's min statistic is above its max")
    if channels.dim() != 1 or channels.dtype.is_floating_point or channels.dtype == torch.bool:
        raise ValueError(f"{where}: channels must be a 1-D integer tensor, got {channels.dtype} {tuple(channels.shape)}")
    if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= hidden):
        raise ValueError(f"{where}: channel indices must lie in [0, {hidden}); got {int(channels.min())}.."
                         f"{int(channels.max())}")
    if channels.numel() > 1 and not bool((channels[1:] > channels[:-1]).all()):
        raise ValueError(f"{where}: channel indices must be distinct and ascending")


def _check_basis(where: str, sources: int, hidden: int, basis: torch.Tensor | None) -> None:
    """A basis is finite, `[sources, directions, hidden]`, and per source orthonormal rows followed
    by zero rows (a source that saw fewer directions): the codec projects on it and back, so a
    scaled or skewed basis gives wrong numbers without a sign (NaN logits at 1e30)."""
    if basis is None:
        return
    if (basis.dim() != 3 or basis.shape[0] != sources or basis.shape[2] != hidden or not basis.dtype.is_floating_point
            or not torch.isfinite(basis).all()):
        raise ValueError(f"{where}: the low-rank basis must be finite [{sources}, directions, {hidden}], "
                         f"got {basis.dtype} {tuple(basis.shape)}")
    b = basis.double()
    gram = b @ b.transpose(1, 2)
    norms = gram.diagonal(dim1=1, dim2=2)
    unit = (norms - 1).abs() <= ORTHONORMAL_TOL
    zero = norms <= ORTHONORMAL_TOL**2
    off = (gram - torch.diag_embed(norms)).abs().amax() if gram.numel() else torch.tensor(0.0)
    if not bool((unit | zero).all()) or float(off) > ORTHONORMAL_TOL:
        worst = float((norms - 1).abs().where(~zero, torch.zeros_like(norms)).amax()) if norms.numel() else 0.0
        raise ValueError(f"{where}: the low-rank basis is not orthonormal (largest row norm error {worst:.3g}, "
                         f"largest dot product between rows {float(off):.3g}; tolerance {ORTHONORMAL_TOL:g}): "
                         "the file was altered or made by another tool; re-run tpcomp-calibrate")
