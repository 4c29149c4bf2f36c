"""What a measurement of the gate (`measure.tune`: `tpcomp-tune`, the start-up probe) times: codecs,
algorithms, transports, message sizes, repetitions."""

from __future__ import annotations

from dataclasses import dataclass

from ...codecs import make_codec, needs_calibration, parse_codec_spec
from .links import LINKS

DEFAULT_CODECS = ("fp4_e2m1/b32/e6m2", "fp6_e2m3/b32/e8m0", "int4/b32/bf16", "lloyd4/b32/e6m2d")
DEFAULT_TOKENS = tuple(1 << i for i in range(14))
"""1 .. 8192 tokens: decode batches at the small end, prefill chunks at the large end."""
TUNE_ALGORITHMS = ("one_shot", "two_shot")
TUNE_TRANSPORTS = ("auto", "nccl", "symm_mem")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """One tuning run; every rank must be given the same."""

    hidden: int
    """Hidden size of the model: the messages are tokens x hidden (the row-parallel all-reduce)."""
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    """Message rows measured (the gate interpolates between them, conservatively)."""
    codecs: tuple[str, ...] = DEFAULT_CODECS
    """Codec specs to measure (block codecs; calibrated codecs need a calibration: not measured)."""
    algorithms: tuple[str, ...] = TUNE_ALGORITHMS
    transports: tuple[str, ...] = ("auto",)
    """One-shot transports: 'nccl', 'symm_mem', or 'auto' (NCCL, plus symmetric memory where it
    can run: CUDA, an NCCL group and NVLink). Two-shot always goes through NCCL."""
    link: str = "auto"
    """Link class recorded in the table key ('auto': detected as the gate detects it)."""
    exact_symm: bool = True
    """Also time PyTorch's lossless symmetric-memory bf16 all-reduces (one-shot, two-shot) where
    they can run, for comparison (the gate's exact fallback stays dist.all_reduce)."""
    graph: bool = True
    """Also time under CUDA-graph replay (CUDA only)."""
    warmup: int = 3
    iters: int = 10
    """Calls per timed sample."""
    repeats: int = 5
    """Timed samples per path and size; the median is this rank's time."""
    margin: float = 0.05
    """How much faster compression must be measured to be chosen (timing noise)."""
    model: str | None = None
    """Where `hidden` came from (`from_model`), recorded in the table."""
    layers: int | None = None
    """The model's layers (two row-parallel all-reduces each), for the report's per-forward figures."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(sorted(set(int(t) for t in self.tokens))))
        for name in ("codecs", "algorithms", "transports"):
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")
        if not self.tokens or self.tokens[0] < 1:
            raise ValueError(f"tokens must be positive integers, got {self.tokens}")
        for name in ("warmup", "iters", "repeats"):
            if getattr(self, name) < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'warmup' else 1}, got {getattr(self, name)}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if self.link != "auto" and self.link not in LINKS:
            raise ValueError(f"unknown link class {self.link!r}; valid: 'auto', {list(LINKS)}")
        bad = [a for a in self.algorithms if a not in TUNE_ALGORITHMS] or (not self.algorithms and ["(none)"])
        if bad:
            raise ValueError(f"algorithms {bad}: choose from {list(TUNE_ALGORITHMS)}")
        bad = [t for t in self.transports if t not in TUNE_TRANSPORTS] or (not self.transports and ["(none)"])
        if bad:
            raise ValueError(f"transports {bad}: choose from {list(TUNE_TRANSPORTS)}")
        if not self.codecs:
            raise ValueError("no codec to measure: pass at least one codec spec")
        canonical = []
        for text in self.codecs:
            spec = parse_codec_spec(text)  # raises naming the valid forms
            if spec is None:
                raise ValueError("codec 'none' is the exact path, measured anyway: pass codec specs")
            if needs_calibration(spec):
                raise ValueError(f"codec {spec} needs a calibration; tpcomp-tune measures uncalibrated codecs only "
                                 "(time its block-codec part instead)")
            why = make_codec(spec).ineligible(self.hidden)
            if why:
                raise ValueError(f"codec {spec} cannot compress hidden size {self.hidden}: {why}")
            canonical.append(str(spec))
        object.__setattr__(self, "codecs", tuple(dict.fromkeys(canonical)))
