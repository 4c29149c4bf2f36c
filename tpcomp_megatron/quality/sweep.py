"""A quality sweep: sweep points, their codecs, and the simulated-TP evaluation loop.

A point is a codec at one TP size with an outlier rule (outlier codecs), an all-reduce
algorithm and error feedback on or off, written in the runtime's grammar (codecs/point.py: what
`--tp-comm-compression` takes) `SPEC[:rule=RULE][:algo=one_shot|two_shot][:feedback=on]`, e.g.
`outlier_int4/k64:rule=absmax_max`, `fp4_e2m1/b32/e8m0:algo=two_shot`, `fp4_e2m1/b32/e6m2:feedback=on`.
Experimental, simulation only: `tpcomp-eval-quality --rotation 64` puts a rotation in front of
every point's block codec (rotation.py; the ROTATION_SWEEP's points).

The loop (`compare`, also used by `sensitivity.py`) runs window-major: each window's uncompressed
logits are computed once and every point is compared against them while they are in memory (a 262k
vocabulary makes storing them all costly).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..calibration import Calibration
from ..codecs import CodecPoint, OutlierSpec, needs_calibration, parse_codec_spec, parse_point
from ..codecs.base import Codec
from ..inference.finite import describe, first_nonfinite_module, is_finite, nonfinite_error
from .calib import layer_codecs
from .metrics import Totals, add_compared, add_reference
from .rotation import RotatedBlockCodec, check_rotation
from .simtp import SimulatedTP
from .text import TokenWindows

DEFAULT_SWEEP = (
    # block codecs (arXiv 2411.09510): formats x block sizes x scale types
    "fp4_e2m1/b32/e8m0", "fp4_e2m1/b16/e8m0", "fp4_e2m1/b8/e8m0", "fp4_e2m1/b32/bf16",
    "int4/b32/bf16", "int4/b16/bf16", "fp5_e2m2/b32/e8m0", "fp5_e3m1/b32/e8m0",
    "fp6_e2m3/b32/e8m0", "fp6_e2m3/b16/e8m0", "fp8_e4m3/b32/e8m0", "int8/b32/bf16",
    # power-of-two scales rounded up (no saturation of the block maximum)
    "fp4_e2m1/b32/e8m0up", "fp4_e2m1/b16/e8m0up", "fp4_e2m1/b8/e8m0up", "int4/b32/e8m0up", "fp8_e4m3/b32/e8m0up",
    # 8-bit scales with 2 mantissa bits: bf16-scale accuracy at E8M0's bits
    "fp4_e2m1/b32/e6m2", "fp4_e2m1/b16/e6m2", "int4/b32/e6m2", "fp5_e2m2/b32/e6m2", "fp6_e2m3/b32/e6m2",
    # static outlier channels (arXiv 2411.07942): the paper's rule and the alternatives
    "outlier_int4/k64:rule=range_sum", "outlier_int4/k64:rule=absmax_max",
    "outlier_int4/k64:rule=range_sq_sum", "outlier_int4/k16:rule=range_sq_sum",
    # hybrid: calibrated outliers in bf16 + a block codec for the rest
    "outlier+fp4_e2m1/b32/e8m0/k64:rule=absmax_max", "outlier+fp4_e2m1/b32/e8m0/k64:rule=range_sq_sum",
    "outlier+fp4_e2m1/b16/e8m0/k64:rule=range_sq_sum", "outlier+fp5_e2m2/b32/e8m0/k64:rule=range_sq_sum",
)
# Experimental (simulation only): with `--rotation 64`, a rotation in front of each block codec.
ROTATION_SWEEP = ("fp4_e2m1/b32/e8m0", "fp4_e2m1/b16/e8m0", "fp4_e2m1/b8/e8m0", "fp5_e2m2/b32/e8m0", "fp6_e2m3/b32/e8m0")
# The deployed default at TP >= 4 is two-shot, which requantizes the reduced chunk.
TWO_SHOT_SWEEP = (
    "fp4_e2m1/b32/e8m0:algo=two_shot", "fp6_e2m3/b32/e8m0:algo=two_shot", "fp8_e4m3/b32/e8m0:algo=two_shot",
    "outlier+fp4_e2m1/b32/e8m0/k64:rule=range_sq_sum:algo=two_shot",
)
SMALL_SWEEP = (
    "fp4_e2m1/b32/e8m0", "fp4_e2m1/b16/e8m0", "fp4_e2m1/b8/e8m0", "int4/b32/bf16", "fp5_e2m2/b32/e8m0",
    "fp6_e2m3/b32/e8m0", "fp8_e4m3/b32/e8m0", "fp4_e2m1/b32/e8m0up", "fp4_e2m1/b32/e6m2", "outlier_int4/k64:rule=range_sum",
    "outlier_int4/k64:rule=range_sq_sum", "outlier+fp4_e2m1/b32/e8m0/k64:rule=range_sq_sum",
)
# Error feedback (comm/feedback.py; through the post-norms on Gemma 2/3).
FEEDBACK_SWEEP = (
    "fp4_e2m1/b32/e6m2:feedback=on", "fp4_e2m1/b16/e6m2:feedback=on", "int4/b32/e6m2:feedback=on",
    "fp5_e2m2/b32/e6m2:feedback=on", "fp4_e2m1/b32/e6m2:algo=two_shot:feedback=on",
)
SWEEPS = {"default": DEFAULT_SWEEP, "small": SMALL_SWEEP, "two_shot": TWO_SHOT_SWEEP, "feedback": FEEDBACK_SWEEP,
          "rotation": ROTATION_SWEEP}


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One evaluated configuration: a point of the runtime grammar (codecs/point.py) at a TP size,
    and, experimental, a rotation in front of its block codec."""

    spec: str
    """Codec spec (project grammar, canonical form)."""
    tp: int
    """Tensor-parallel size."""
    rule: str | None = None
    """Outlier selection rule (outlier codecs only); None: the calibration file's."""
    algorithm: str = "one_shot"
    """'one_shot' or 'two_shot' (requantizes the reduced chunk)."""
    feedback: bool = False
    """Error feedback (comm/feedback.py): each rank carries its error into its next reduction."""
    rotation: int | None = None
    """EXPERIMENTAL (`tpcomp-eval-quality --rotation G`, rotation.py): a randomized Hadamard
    rotation of size G in front of the block codec; simulation only."""

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 2:
            raise ValueError(f"TP size must be an integer >= 2 (TP=1 communicates nothing), got {self.tp!r}")
        point = CodecPoint(spec=parse_codec_spec(self.spec), rule=self.rule, algorithm=self.algorithm,
                           feedback=self.feedback)
        if point.spec is None:
            raise ValueError("'none' is the baseline, not a sweep point")
        if self.rotation is not None:
            check_rotation(self.rotation, point.spec)
        object.__setattr__(self, "spec", str(point.spec))  # canonical form, e.g. defaults filled in

    @property
    def experimental(self) -> bool:
        return self.rotation is not None

    @property
    def outlier(self) -> bool:
        """An outlier codec (it has a selection rule)."""
        return isinstance(parse_codec_spec(self.spec), OutlierSpec)

    @property
    def needs_calibration(self) -> bool:
        return needs_calibration(parse_codec_spec(self.spec))

    @property
    def codec_label(self) -> str:
        """The codec as records name it (`rot<G>+<spec>` for a rotated point)."""
        return self.spec if self.rotation is None else f"rot{self.rotation}+{self.spec}"

    @property
    def label(self) -> str:
        parts = ([self.codec_label] + ([f"rule={self.rule}"] if self.rule else [])
                 + ([f"algo={self.algorithm}"] if self.algorithm != "one_shot" else [])
                 + (["feedback=on"] if self.feedback else []))
        return f"TP={self.tp} " + ":".join(parts)

    @classmethod
    def parse(cls, text: str, tp: int, *, rotation: int | None = None) -> SweepPoint:
        """A point written in the runtime grammar (`parse_point`: what `--tp-comm-compression` takes)."""
        point = parse_point(text)
        if point.spec is None:
            raise ValueError("'none' is the baseline, not a sweep point")
        return cls(spec=str(point.spec), tp=tp, rule=point.rule, algorithm=point.algorithm or "one_shot",
                   feedback=bool(point.feedback), rotation=rotation)


def point_codecs(point: SweepPoint, layers: Sequence[str], hidden: int, calibration: Calibration | None) -> dict[str, Codec]:
    if point.experimental:
        codec = RotatedBlockCodec(parse_codec_spec(point.spec), point.rotation, hidden)
        return {n: codec for n in layers}
    if point.needs_calibration:
        if calibration is None:
            raise ValueError(f"{point.label} needs a calibration file made at TP={point.tp} (tpcomp-calibrate --tp {point.tp})")
        calibration.check_matches(tp_size=point.tp, hidden=hidden)
    return layer_codecs(point.spec, layers, calibration if point.needs_calibration else None, rule=point.rule)


@dataclass
class SweepResult:
    baseline: Totals
    totals: dict[SweepPoint, Totals]
    bits: dict[SweepPoint, float]
    seconds: dict[SweepPoint, float]


@dataclass(frozen=True)
class Plan:
    """What one compared forward runs: a TP size, every layer's codec (None: exact), an algorithm,
    error feedback on or off."""

    tp: int
    codecs: Mapping[str, Codec | None]
    algorithm: str = "one_shot"
    feedback: bool = False


def compare(model, sim: SimulatedTP, windows: TokenWindows, plans: Sequence[Plan], *, labels: Sequence[str] = (),
            log: Callable[[str], None] = lambda s: None) -> tuple[Totals, list[Totals], list[float]]:
    """(baseline totals, totals of each plan, seconds of each plan) over every window, against the
    unmodified model's logits. Window-major: each window's uncompressed logits are computed once."""
    base, totals, seconds = Totals(), [Totals() for _ in plans], [0.0] * len(plans)
    n = windows.inputs.shape[0]
    with torch.no_grad():
        for i in range(n):
            x, targets = windows.inputs[i:i + 1], windows.targets(i)
            ref = windows.scored_logits(model(x).logits[0])
            if not is_finite(ref):  # the model itself, not a point: nothing can be scored
                raise nonfinite_error(f"window {i + 1}, uncompressed", model, lambda: model(x))
            add_reference(base, ref, targets)
            for j, plan in enumerate(plans):
                t0 = time.perf_counter()
                with sim.session(tp=plan.tp, codecs=plan.codecs, algorithm=plan.algorithm, feedback=plan.feedback):
                    logits = windows.scored_logits(model(x).logits[0])
                    if totals[j].nonfinite is None and not is_finite(logits):  # marks the point's record
                        totals[j].nonfinite = f"window {i + 1}: {describe(first_nonfinite_module(model, lambda: model(x)))}"
                        log(f"{labels[j] if j < len(labels) else f'plan {j + 1}'}: NaN or inf logits at "
                            f"{totals[j].nonfinite}")
                add_compared(totals[j], logits, ref, targets)
                seconds[j] += time.perf_counter() - t0
            log(f"window {i + 1}/{n}: baseline ppl so far {base.ppl:.3f}; "
                + "; ".join(f"{label} {t.ppl:.3f}" for label, t in list(zip(labels, totals))[:3])
                + (" ..." if len(plans) > 3 else ""))
    return base, totals, seconds


def run_simulated(model, sim: SimulatedTP, windows: TokenWindows, points: Sequence[SweepPoint],
                  calibrations: Mapping[int, Calibration], *, log: Callable[[str], None] = lambda s: None) -> SweepResult:
    """Evaluate every point on every window against the unmodified model's logits."""
    codecs = {}
    for p in points:  # built (and validated) before any forward, so a bad point fails fast
        try:
            codecs[p] = point_codecs(p, list(sim.layers), sim.hidden, calibrations.get(p.tp))
        except ValueError as e:
            raise ValueError(f"{p.label}: {e}") from None
    base, totals, seconds = compare(model, sim, windows, [Plan(p.tp, codecs[p], p.algorithm, p.feedback) for p in points],
                                    labels=[p.label for p in points], log=log)
    return SweepResult(baseline=base, totals=dict(zip(points, totals)),
                       bits={p: next(iter(codecs[p].values())).bits_per_value(sim.hidden) for p in points},
                       seconds=dict(zip(points, seconds)))
