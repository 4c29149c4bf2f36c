"""A codec spec with its run options: the one grammar of the runtime flag and the evaluation tools.

    SPEC[:rule=RULE][:algo=one_shot|two_shot][:feedback=on|off]

e.g. `fp6`, `fp4_e2m1/b32/e6m2:feedback=on`, `outlier_int4/k64:rule=absmax_max:algo=two_shot`.
`--tp-comm-compression` (and `CompressionConfig.spec`) take exactly what the evaluation tools'
sweep points take, so a configuration measured there can be deployed as written. An option left
out is None here: the separate flags (`--tp-comm-algorithm`, `--tp-comm-error-feedback`) or the
calibration file's rule decide it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..calibration import RULES
from .spec import CodecSpec, OutlierSpec, parse_codec_spec

POINT_ALGORITHMS = ("one_shot", "two_shot")
GRAMMAR = "SPEC[:rule=RULE][:algo=one_shot|two_shot][:feedback=on|off]"


@dataclass(frozen=True, kw_only=True)
class CodecPoint:
    """A parsed `SPEC[:options]`."""

    spec: CodecSpec | None
    """The codec (None: 'none', exact)."""
    rule: str | None = None
    """Outlier channel selection rule (outlier codecs only; one of calibration.RULES)."""
    algorithm: str | None = None
    """All-reduce algorithm, 'one_shot' or 'two_shot'; None: not given."""
    feedback: bool | None = None
    """Error feedback on or off; None: not given."""

    def __post_init__(self) -> None:
        if self.rule is not None:
            if self.rule not in RULES:
                raise ValueError(f"rule {self.rule!r}: choose one of {list(RULES)}")
            if not isinstance(self.spec, OutlierSpec):
                raise ValueError(f"{self.spec or 'none'}: ':rule=' applies to outlier codecs only")
        if self.algorithm is not None and self.algorithm not in POINT_ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r}: choose one of {list(POINT_ALGORITHMS)}")

    def __str__(self) -> str:
        opts = ([f"rule={self.rule}"] if self.rule else []) + ([f"algo={self.algorithm}"] if self.algorithm else [])
        opts += [] if self.feedback is None else [f"feedback={'on' if self.feedback else 'off'}"]
        return ":".join([str(self.spec or "none")] + opts)


def parse_point(text: str) -> CodecPoint:
    """Parse `SPEC[:options]`; raises ValueError naming the grammar."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string {GRAMMAR}, got {text!r}")
    spec, *opts = text.strip().split(":")
    kw: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = {"algo": "algorithm"}.get(key, key)
        bad_value = key == "feedback" and value not in ("on", "off")
        if not eq or key not in ("rule", "algorithm", "feedback") or key in kw or bad_value:
            raise ValueError(f"bad option {opt!r} in {text!r}; use {GRAMMAR}")
        kw[key] = value
    feedback = None if "feedback" not in kw else kw["feedback"] == "on"
    try:
        return CodecPoint(spec=parse_codec_spec(spec), rule=kw.get("rule"), algorithm=kw.get("algorithm"),
                          feedback=feedback)
    except ValueError as e:
        if str(e).startswith(("invalid codec", "unknown codec", "bad or repeated", "empty codec")):
            raise
        raise ValueError(f"{text!r}: {e}") from None
