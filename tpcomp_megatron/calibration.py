"""Calibration data for the outlier codecs: statistics, outlier selection, and the file format.

Statistics of one row-parallel layer are per-channel minimum and maximum of the partial sums, one
row per source: ranks 0..world-1 and, last, the full (reduced) sum, `[world + 1, hidden]`.

File format (`*.safetensors`), for each layer name L (e.g. `decoder.layers.3.mlp.linear_fc2`):
    `L.min`, `L.max`: float32 `[world + 1, hidden]`; `L.channels`: int64 `[k]` (ascending).
The safetensors metadata holds one key, `tpcomp_calibration`, a JSON object:
    {"version": 1, "model": str, "tp_size": int, "hidden": int, "ratio": int, "rule": str,
     "layers": [str, ...], "tokens": int, "text": str}
Loading checks it against the model and TP size it is used with and names any mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

FORMAT_KEY = "tpcomp_calibration"
VERSION = 1
LEVELS = 15  # 4-bit unsigned codes
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

    def digest(self) -> str:
        """Short hash of the statistics and selections, to check that all ranks use the same."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True, default=str).encode())
        for name in sorted(self.stats):
            for t in (*self.stats[name], self.channels[name]):
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def params(self, layer: str) -> OutlierParams:
        if layer not in self.channels:
            raise ValueError(f"calibration has no entry for layer {layer!r}; it covers {sorted(self.channels)[:4]}...")
        lo, hi = self.stats[layer]
        return OutlierParams.from_stats(lo, hi, self.channels[layer])

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
    meta = {**cal.meta, "version": VERSION, "layers": sorted(cal.stats)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={FORMAT_KEY: json.dumps(meta)})
    os.replace(tmp, path)  # never leave a half-written calibration file behind


def load_calibration(path: str) -> Calibration:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(FORMAT_KEY)
        if raw is None:
            raise ValueError(f"{path} is not a tpcomp calibration file (no {FORMAT_KEY!r} metadata)")
        meta = json.loads(raw)
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: calibration format version {meta.get('version')} is not {VERSION}")
        stats, channels = {}, {}
        for name in meta["layers"]:
            stats[name] = (f.get_tensor(f"{name}.min"), f.get_tensor(f"{name}.max"))
            channels[name] = f.get_tensor(f"{name}.channels")
    return Calibration(meta=meta, stats=stats, channels=channels)
