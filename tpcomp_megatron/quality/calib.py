"""Calibration from partial-sum statistics: collect, select outlier channels, build per-layer codecs.

Statistics follow `tpcomp_megatron.calibration`: per layer, per-channel min and max of every rank's
partial sum and, in the last row, of the full (reduced) sum, `[tp + 1, hidden]` float32, and a
sketch of their leading directions (the low-rank codecs' bases). They do not depend on the outlier
rule, ratio or rank, so one file serves every (rule, k) and every rank up to its directions:
`Calibration.reselect` derives the channels for another choice from the same statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..calibration import (RULES, SKETCH_ROWS, Calibration, load_calibration, select_outlier_channels, sketch_basis,
                           sketch_rows)
from ..codecs import OutlierSpec, calibrated_params, make_codec, needs_calibration, parse_codec_spec
from ..codecs.base import Codec
from .simtp import exact_sum


class PartialSumStats:
    """Running per-channel min/max and direction sketch of each rank's partial sum and of their
    exact sum.

    Usable as a `SimulatedTP.session(observer=...)`; real ranks' statistics are merged with
    `update` and `set_sketch`.
    """

    def __init__(self, directions: int = SKETCH_ROWS) -> None:
        self.directions = directions
        self.min: dict[str, torch.Tensor] = {}
        self.max: dict[str, torch.Tensor] = {}
        self.sketches: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, partials: torch.Tensor) -> None:
        stacked = torch.cat([partials.float(), exact_sum(partials).unsqueeze(0)])
        self.update(name, stacked.amin(dim=1), stacked.amax(dim=1))
        self.sketches[name] = sketch_rows(self.sketches.get(name), stacked, self.directions)

    def set_sketch(self, name: str, sketch: torch.Tensor) -> None:
        """A finished sketch `[sources, rows, hidden]` of one layer (real ranks sketch their own)."""
        self.sketches[name] = sketch.detach().float().cpu()

    def bases(self) -> dict[str, torch.Tensor]:
        """Orthonormal directions per layer, `[sources, directions, hidden]`."""
        return {n: sketch_basis(s, self.directions) for n, s in sorted(self.sketches.items())}

    def update(self, name: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Merge per-source extremes `[sources, hidden]` into the running ones."""
        lo, hi = lo.detach().float().cpu(), hi.detach().float().cpu()
        if name in self.min:
            if self.min[name].shape != lo.shape:
                raise ValueError(f"{name}: statistics of shape {tuple(lo.shape)} do not match {tuple(self.min[name].shape)}")
            torch.minimum(self.min[name], lo, out=self.min[name])
            torch.maximum(self.max[name], hi, out=self.max[name])
        else:
            self.min[name], self.max[name] = lo.clone(), hi.clone()

    def as_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        bad = [n for n in self.min if not (torch.isfinite(self.min[n]).all() and torch.isfinite(self.max[n]).all())]
        if bad:
            raise ValueError(f"non-finite partial sums seen in {bad[:3]}: the model or its inputs are broken")
        return {n: (self.min[n], self.max[n]) for n in sorted(self.min)}


def load_for_evaluation(path: str, *, tp: int, hidden: int, model: str, eval_text: str) -> Calibration:
    """A calibration file checked against the model and TP size it is used with, and refused when
    it was made on the evaluation text (`eval_text`, a canonical text spec): that would tune the
    codec on the test set."""
    cal = load_calibration(str(path))
    cal.check_matches(tp_size=tp, hidden=hidden, model=model)
    if cal.meta.get("text", "").split(" tokens ")[0] == eval_text:
        raise ValueError(f"{path} was calibrated on {eval_text}, the evaluation text: calibrate on another text")
    return cal


def num_outliers(hidden: int, ratio: int) -> int:
    return OutlierSpec(ratio=ratio).num_outliers(hidden)


def build_calibration(stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, model: str, tp: int,
                      ratio: int = 64, rule: str = "range_sum", tokens: int, text: str,
                      codec: str | None = None, source: str = "simulated",
                      bases: Mapping[str, torch.Tensor] | None = None) -> Calibration:
    """A `Calibration` (statistics + channels chosen by `rule`, k = ceil(hidden / ratio), and the
    low-rank `bases` when given)."""
    if rule not in RULES:
        raise ValueError(f"unknown outlier selection rule {rule!r}; valid: {list(RULES)}")
    if not stats:
        raise ValueError("no statistics: the model has no row-parallel layer or no text was run")
    hidden = {lo.shape[1] for lo, _ in stats.values()}
    sources = {lo.shape[0] for lo, _ in stats.values()}
    if len(hidden) != 1 or sources != {tp + 1}:
        raise ValueError(f"statistics must all be [tp + 1 = {tp + 1}, hidden]; got sources {sources}, hidden {hidden}")
    h = hidden.pop()
    k = num_outliers(h, ratio)
    channels = {n: select_outlier_channels(lo, hi, k, rule) for n, (lo, hi) in stats.items()}
    meta = {"model": model, "tp_size": tp, "hidden": h, "ratio": ratio, "rule": rule, "tokens": tokens,
            "text": text, "codec": codec or f"outlier_int4/k{ratio}", "source": source}
    bases = dict(bases or {})
    if bases and set(bases) != set(stats):
        raise ValueError(f"bases cover {len(bases)} layers, the statistics {len(stats)}: they must cover the same layers")
    for n, b in bases.items():
        if b.dim() != 3 or b.shape[0] != tp + 1 or b.shape[2] != h:
            raise ValueError(f"{n}: bases of shape {tuple(b.shape)}, expected [tp + 1 = {tp + 1}, rank, {h}]")
    return Calibration(meta=meta, stats=dict(stats), channels=channels, bases=bases)


def layer_codecs(spec: str, layers: Iterable[str], calibration: Calibration | None = None, *,
                 rule: str | None = None) -> dict[str, Codec]:
    """One codec per layer name for `spec`; outlier codecs take their channels from `calibration`
    (re-selected for the spec's ratio and `rule`, default the file's rule), low-rank codecs their
    bases."""
    parsed = parse_codec_spec(spec)
    if parsed is None:
        raise ValueError("spec 'none' has no codec: compression is off")
    layers = list(layers)
    if rule is not None and not isinstance(parsed, OutlierSpec):
        raise ValueError(f"{spec}: an outlier rule only applies to outlier codecs")
    if not needs_calibration(parsed):
        codec = make_codec(parsed)
        return {n: codec for n in layers}
    if calibration is None:
        raise ValueError(f"codec {spec} needs a calibration file: run tpcomp-calibrate first")
    cal = calibration.reselect(ratio=parsed.ratio, rule=rule) if isinstance(parsed, OutlierSpec) else calibration
    return {n: make_codec(parsed, calibrated_params(parsed, cal, n)) for n in layers}
