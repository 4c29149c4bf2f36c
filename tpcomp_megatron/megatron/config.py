"""What a user asks of tensor-parallel compression: `CompressionConfig`, plain validated values.

Reading files (recipe, calibration, gate table) and looking at the model is the deployment step's
(`deploy.resolve`); attaching what it resolved is `apply.apply_tp_compression`'s.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..calibration import RULES
from ..codecs import BlockSpec, needs_calibration, parse_codec_spec, parse_point
from ..comm import ALGORITHMS, GatePolicy

ROW_LAYERS = {"linear_proj": "self_attention", "linear_fc2": "mlp"}
GATHER_LAYERS = {"linear_qkv": "self_attention", "linear_fc1": "mlp"}


def is_row_layer(name: str) -> bool:
    """Whether module `name` is a row-parallel reduction compression applies to
    ('...self_attention.linear_proj', '...mlp.linear_fc2')."""
    parent, _, leaf = name.rpartition(".")
    return leaf in ROW_LAYERS and parent.endswith(ROW_LAYERS[leaf])


@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """Which collectives of a Megatron model are compressed, and how."""

    spec: str = "none"
    """Codec of the row-parallel reductions (`--tp-comm-compression`): a preset ('fp4', 'fp6',
    'fp8': codecs/presets.py), an expert spec such as 'fp4_e2m1/b32/e8m0', or either with the
    evaluation tools' options, 'SPEC[:rule=RULE][:algo=one_shot|two_shot][:feedback=on|off]'
    (codecs/point.py); an option given there sets `outlier_rule`, `algorithm`, `error_feedback`."""
    layers: tuple[str, ...] = ("linear_proj", "linear_fc2")
    """Row-parallel layers to compress: any of 'linear_proj' (attention), 'linear_fc2' (MLP)."""
    gather_spec: str = "none"
    """Block codec of the sequence-parallel all-gathers into linear_qkv / linear_fc1."""
    calibration: str | None = None
    """Calibration file (tools/calibrate.py); required by outlier codecs."""
    algorithm: str = "auto"
    """All-reduce algorithm: 'auto', 'one_shot' or 'two_shot'."""
    link: str = "auto"
    """Link class for the gate's thresholds: 'auto', 'nvlink', 'pcie_class', 'network_class', 'cpu'."""
    min_bytes: int | None = None
    """Override the gate's size threshold (bytes of the bf16 message); 0 compresses every call."""
    model: str | None = None
    """The model's name as calibration files record it (`tpcomp-calibrate`: a known model name or
    the Hugging Face folder's name); when set, a calibration file made for another model is refused
    even if its hidden size and TP size match."""
    transport: str = "auto"
    """How one-shot payloads travel (`--tp-comm-transport`): 'auto' (symmetric memory on NVLink,
    NCCL elsewhere), 'nccl', or 'symm_mem'; where symmetric memory cannot run, NCCL, said once."""
    overrides: tuple[tuple[str, str], ...] = ()
    """Per-layer codecs: (glob over module names, spec or 'none'), first match wins, e.g.
    ('decoder.layers.0.*', 'fp8_e4m3/b32/e8m0up') for a plan from `tpcomp-sensitivity`."""
    error_feedback: bool = False
    """Carry each rank's quantization error into its next compressed reduction
    (`--tp-comm-error-feedback`, comm/feedback.py): same bits, errors telescope along depth."""
    outlier_rule: str | None = None
    """Outlier channel selection rule of outlier codecs (calibration.RULES); None: the calibration
    file's. The channels are re-selected from the file's statistics."""
    recipe: str | None = None
    """A recipe file (`--tp-comm-recipe`, recipe.py): every layer's codec, error feedback and the
    calibration data, applied as one unit; `spec`, `overrides` and `calibration` stay unset, and
    `error_feedback` / `outlier_rule` unset or equal to the recipe's. Read, and checked against the
    model and TP size, by `deploy.resolve`."""
    gate_table: str | None = None
    """The gate's measured table (`--tp-comm-gate-table`, written by `tpcomp-tune`): a path, 'seed'
    (the seed thresholds, no table), or None: the cached table of this machine, device, world size,
    link and versions (`~/.cache/tpcomp-megatron/gate/`), else the seed thresholds. A table measured
    under another key is refused, naming the field."""
    gate_probe: bool | None = None
    """With no measured table for this run: time a few collectives over the real group at
    `apply_tp_compression` and let the gate follow them (`comm/gate/probe.py`; seconds, conservative).
    None: probe on NCCL groups when the gate decides by size (no `min_bytes`, no 'seed' table);
    True: also elsewhere (gloo); False: never (the seed thresholds)."""
    cuda_graphs: bool = True
    """Eager CUDA collectives replay a CUDA graph of themselves, one per padded row count, from its
    second call on, or from start-up with `CompressionHandle.capture_graphs` (comm/graphs.py: a
    prefill's layers and nearby prompt lengths share one; same kernels, same result); False:
    every call launches its kernels and process-group calls."""
    reduce_spec: object = field(init=False, repr=False, compare=False)
    override_specs: tuple = field(init=False, repr=False, compare=False)
    gather_codec_spec: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        bad = [l for l in self.layers if l not in ROW_LAYERS]
        if bad or not self.layers:
            raise ValueError(f"layers {list(self.layers)}: choose one or more of {sorted(ROW_LAYERS)}")
        point = parse_point(self.spec)
        reduce_spec = point.spec
        self._take_point_options(point)
        self._check_recipe_alone()
        gather_spec = parse_codec_spec(self.gather_spec)
        if gather_spec is not None and not isinstance(gather_spec, BlockSpec):
            raise ValueError(f"gather_spec {self.gather_spec!r}: the sequence-parallel all-gather needs a "
                             "block codec (outlier codecs are calibrated on partial sums, not on gathered inputs)")
        overrides = tuple((str(pat), str(spec)) for pat, spec in self.overrides)
        override_specs = tuple((pat, parse_codec_spec(spec)) for pat, spec in overrides)
        object.__setattr__(self, "overrides", overrides)
        object.__setattr__(self, "override_specs", override_specs)
        object.__setattr__(self, "reduce_spec", reduce_spec)
        if self.needs_calibration and not self.calibration:
            spec = next(s for s in self._reduction_specs() if needs_calibration(s))
            raise ValueError(f"codec {spec} needs a calibration file: run tools/calibrate.py and pass it")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r}: choose one of {list(ALGORITHMS)}")
        GatePolicy(algorithm=self.algorithm, link=self.link if self.link != "auto" else "cpu", min_bytes=self.min_bytes,
                   transport=self.transport)
        if self.gate_table is not None and not isinstance(self.gate_table, str):
            raise ValueError(f"gate_table must be a path, 'seed' or None, got {type(self.gate_table).__name__}")
        object.__setattr__(self, "gather_codec_spec", gather_spec)

    def _take_point_options(self, point) -> None:
        """The options written in `spec` become the fields they stand for; a field set otherwise to
        something else is a conflict, not a silent choice."""
        for name, value, unset in (("algorithm", point.algorithm, "auto"), ("error_feedback", point.feedback, False),
                                   ("outlier_rule", point.rule, None)):
            if value is None:
                continue
            if getattr(self, name) not in (unset, value):
                raise ValueError(f"spec {self.spec!r} sets {name}={value!r}, but {name}={getattr(self, name)!r} was "
                                 "also given: set it in one place")
            object.__setattr__(self, name, value)
        if self.outlier_rule is not None and self.outlier_rule not in RULES:
            raise ValueError(f"outlier_rule {self.outlier_rule!r}: choose one of {list(RULES)}")

    def _check_recipe_alone(self) -> None:
        if self.recipe is None:
            return
        set_too = (("spec", self.spec.strip().lower() != "none"), ("overrides", bool(self.overrides)),
                   ("calibration", self.calibration is not None))
        given = [name for name, is_set in set_too if is_set]
        if given:
            raise ValueError(f"recipe {self.recipe} is applied as one unit: it sets {', '.join(given)} itself "
                             "(drop those flags, or drop the recipe)")

    @property
    def enabled(self) -> bool:
        return (self.reduce_spec is not None or self.gather_codec_spec is not None or self.recipe is not None
                or any(spec is not None for _, spec in self.override_specs))

    def _reduction_specs(self) -> tuple:
        return (self.reduce_spec,) + tuple(spec for _, spec in self.override_specs)

    @property
    def needs_calibration(self) -> bool:
        """Whether some reduction of `spec` or `overrides` uses a calibrated (outlier or low-rank)
        codec (a recipe carries its own calibration)."""
        return any(needs_calibration(spec) for spec in self._reduction_specs())

    def layer_spec(self, name: str):
        """The reduction codec spec of the row-parallel layer `name` (None: exact)."""
        for pattern, spec in self.override_specs:
            if fnmatch.fnmatchcase(name, pattern):
                return spec
        return self.reduce_spec

    def describe(self) -> str:
        """Canonical text of the settings that must agree across ranks (the data a recipe or
        calibration file holds is compared by `deploy.resolve`, which reads it)."""
        return (f"spec={self.reduce_spec or 'none'} layers={','.join(sorted(self.layers))} "
                f"overrides={[(p, str(sp or 'none')) for p, sp in self.override_specs]} "
                f"gather={self.gather_codec_spec or 'none'} algorithm={self.algorithm} "
                f"error_feedback={self.error_feedback} outlier_rule={self.outlier_rule} "
                f"min_bytes={self.min_bytes} recipe={self.recipe is not None} cuda_graphs={self.cuda_graphs}")
