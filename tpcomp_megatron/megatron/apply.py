"""Put compression on a built Megatron `GPTModel`, and take it off again.

`apply_tp_compression(model, config)` finds the row-parallel `linear_proj` (attention) and
`linear_fc2` (MLP) of every transformer layer, and, with a gather codec under sequence
parallelism, the column-parallel `linear_qkv` / `linear_fc1`. Layers built from a spec made by
`compressed_layer_spec` already have the compressed class; stock Megatron layers are switched to
it in place (the subclass adds no state, so only `__class__` changes). With error feedback on,
every row-parallel reduction (the compressed ones, and the exact ones, which pay the debt) shares
one `ErrorFeedback` state, reset by a forward pre-hook on the model; a layer whose output passes a
post-norm (Gemma 2/3: `post_layernorm` of its attention / MLP) pays through that norm's gain. The
returned handle's `remove()` restores every class and attribute it changed and removes the hook.
Nothing global is patched.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from ..calibration import RULES, Calibration, load_calibration
from ..codecs import BlockSpec, OutlierSpec, calibrated_params, make_codec, needs_calibration, parse_codec_spec, parse_point
from ..comm import ALGORITHMS, CompressedComm, GatePolicy, check_same_config
from ..comm.gate.resolve import resolve as resolve_gate
from ..comm.feedback import ErrorFeedback, PostNorm
from .layers import CompressedColumnParallelLinear, CompressedRowParallelLinear
from .mappings import LayerCompression

ROW_LAYERS = {"linear_proj": "self_attention", "linear_fc2": "mlp"}
GATHER_LAYERS = {"linear_qkv": "self_attention", "linear_fc1": "mlp"}


def _is_row_layer(name: str) -> bool:
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
    calibration data, applied as one unit; `spec`, `overrides`, `calibration`, `error_feedback` and
    `outlier_rule` stay unset. Checked against the model and TP size at `apply_tp_compression`."""
    loaded_recipe: object = field(init=False, repr=False, compare=False)
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
    """Eager CUDA collectives replay a CUDA graph of themselves from the second call of a shape on
    (comm/graphs.py: a prefill's layers share one; same kernels, same result); False: every call
    launches its kernels and process-group calls."""
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
        object.__setattr__(self, "loaded_recipe", self._load_recipe())
        gather_spec = parse_codec_spec(self.gather_spec)
        if gather_spec is not None and not isinstance(gather_spec, BlockSpec):
            raise ValueError(f"gather_spec {self.gather_spec!r}: the sequence-parallel all-gather needs a "
                             "block codec (outlier codecs are calibrated on partial sums, not on gathered inputs)")
        overrides = tuple((str(pat), str(spec)) for pat, spec in self.overrides)
        override_specs = tuple((pat, parse_codec_spec(spec)) for pat, spec in overrides)
        if self.loaded_recipe is not None:  # one exact-name override per layer of the recipe
            override_specs = tuple((name, parse_codec_spec(spec)) for name, spec in self.loaded_recipe.layers.items())
        object.__setattr__(self, "overrides", overrides)
        object.__setattr__(self, "override_specs", override_specs)
        object.__setattr__(self, "reduce_spec", reduce_spec)
        if self.needs_calibration and not self.calibration and self.loaded_recipe is None:
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

    def _load_recipe(self):
        if self.recipe is None:
            return None
        set_too = (("spec", self.spec.strip().lower() != "none"), ("overrides", bool(self.overrides)),
                   ("calibration", self.calibration is not None))
        given = [name for name, is_set in set_too if is_set]
        if given:
            raise ValueError(f"recipe {self.recipe} is applied as one unit: it sets {', '.join(given)} itself "
                             "(drop those flags, or drop the recipe)")
        from ..recipe import load_recipe

        recipe = load_recipe(self.recipe)
        # equal values are no conflict (dataclasses.replace passes the fields set from the recipe)
        for name, value, unset in (("error_feedback", recipe.error_feedback, False),
                                   ("outlier_rule", recipe.outlier_rule, None)):
            if getattr(self, name) not in (unset, value):
                raise ValueError(f"recipe {self.recipe} sets {name}={value!r}, but {name}={getattr(self, name)!r} "
                                 "was also given: the recipe is applied as one unit")
            object.__setattr__(self, name, value)
        return recipe

    @property
    def enabled(self) -> bool:
        return (self.reduce_spec is not None or self.gather_codec_spec is not None
                or any(spec is not None for _, spec in self.override_specs))

    def _reduction_specs(self) -> tuple:
        return (self.reduce_spec,) + tuple(spec for _, spec in self.override_specs)

    @property
    def needs_calibration(self) -> bool:
        """Whether some reduction uses a calibrated (outlier or low-rank) codec."""
        return any(needs_calibration(spec) for spec in self._reduction_specs())

    def layer_spec(self, name: str):
        """The reduction codec spec of the row-parallel layer `name` (None: exact)."""
        for pattern, spec in self.override_specs:
            if fnmatch.fnmatchcase(name, pattern):
                return spec
        return self.reduce_spec

    def describe(self, calibration: Calibration | None = None) -> str:
        """Canonical text of everything that must agree across ranks (`calibration`: the loaded
        calibration in use, else the file named by the config is hashed)."""
        cal = "none"
        if self.recipe is not None:  # its codecs are in the overrides, its data in `calibration`
            with open(self.recipe, "rb") as f:
                cal = "recipe:" + hashlib.sha256(f.read()).hexdigest()[:16]
        elif calibration is not None:
            cal = calibration.digest()
        elif self.calibration:
            with open(self.calibration, "rb") as f:
                cal = hashlib.sha256(f.read()).hexdigest()[:16]
        return (f"spec={self.reduce_spec or 'none'} layers={','.join(sorted(self.layers))} "
                f"overrides={[(p, str(sp or 'none')) for p, sp in self.override_specs]} "
                f"gather={self.gather_codec_spec or 'none'} algorithm={self.algorithm} "
                f"error_feedback={self.error_feedback} outlier_rule={self.outlier_rule} "
                f"min_bytes={self.min_bytes} calibration={cal}")


class CompressionHandle:
    """Undo record of `apply_tp_compression`; also exposes the communicator's counters."""

    def __init__(self, comm: CompressedComm | None, feedback: ErrorFeedback | None = None):
        self.comm = comm
        self.feedback = feedback
        self._changed: list[tuple[torch.nn.Module, type]] = []
        self._hooks: list = []

    @property
    def stats(self):
        return None if self.comm is None else self.comm.stats

    def _attach(self, module: torch.nn.Module, compressed_cls: type, lc: LayerCompression) -> None:
        self._changed.append((module, type(module)))
        if not isinstance(module, compressed_cls):
            module.__class__ = compressed_cls
        module.tp_compression = lc

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, cls in reversed(self._changed):
            module.__dict__.pop("tp_compression", None)
            module.__class__ = cls
        self._changed.clear()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP / Float16Module wrappers
    return model


def _check_class(name: str, module: torch.nn.Module, base: type) -> None:
    if type(module) not in (base, CompressedRowParallelLinear, CompressedColumnParallelLinear):
        raise ValueError(
            f"{name} is a {type(module).__name__}, not Megatron's {base.__name__}: build the model "
            "with the local (non-Transformer-Engine) layer spec, or with compressed_layer_spec()"
        )


def _post_norm(parent: torch.nn.Module, name: str, module: RowParallelLinear) -> PostNorm | None:
    """The post-norm `name`'s output passes before the residual add (Gemma 2/3), for error feedback."""
    norm = getattr(parent, "post_layernorm", None)
    if norm is None:
        return None
    if module.sequence_parallel:
        raise ValueError(f"{name}: error feedback through a post-norm needs every output row (the norm's RMS), "
                         "which the sequence-parallel reduce-scatter does not give a rank; turn one of them off")
    # The norm's RMS is taken over the reduction's output; a bias added after the reduction (Gemma
    # has none) would shift it slightly, which the next settle corrects.
    return PostNorm.probe(norm, module.output_size)


def _check_recipe(model: torch.nn.Module, config: CompressionConfig, group, model_config) -> None:
    """A recipe made for another model, TP size or layer set is refused, naming the mismatch."""
    from ..recipe import model_fingerprint

    inner = _unwrap(model)
    names = [n for n, _ in inner.named_modules() if _is_row_layer(n)]
    mc = getattr(inner, "config", None)
    config.loaded_recipe.check(tp_size=dist.get_world_size(group), layer_names=names,
                               hidden=getattr(mc, "hidden_size", None), num_layers=getattr(mc, "num_layers", None),
                               fingerprint=None if model_config is None else model_fingerprint(model_config),
                               model_name=config.model, where=f"recipe {config.recipe}")


def apply_tp_compression(model: torch.nn.Module, config: CompressionConfig, *, group=None,
                         calibration: Calibration | None = None, model_config=None) -> CompressionHandle:
    """Attach compression to `model`'s tensor-parallel layers; returns a handle with `remove()`.

    Collective: every rank of `group` (default: Megatron's tensor-parallel group) must call it;
    ranks given different configurations get a ValueError here instead of a hang later.
    `model_config` (the checkpoint's `models.config.LlamaModelConfig`, optional): a recipe's model
    fingerprint is then checked in full (architecture, vocab, config hash), not only the hidden
    size, layer count and layer names the built model shows.
    """
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if config.loaded_recipe is not None:
        _check_recipe(model, config, group, model_config)
        calibration = calibration or config.loaded_recipe.calibration
    if calibration is None and config.needs_calibration:
        calibration = load_calibration(config.calibration)
    gate = resolve_gate(group, algorithm=config.algorithm, link=config.link, min_bytes=config.min_bytes,
                        transport=config.transport, table=config.gate_table,
                        probe=config.gate_probe if config.enabled else False)
    # the gate as resolved on this rank (e.g. the detected link class, the measured table's
    # identity, whether this rank refused it) is checked too: ranks that differ fail here
    check_same_config(f"{config.describe(calibration)} {gate.describe()}", group)
    if gate.refusal:
        raise ValueError(gate.refusal)
    if not config.enabled:
        return CompressionHandle(None)
    hidden = next((m.output_size for n, m in _unwrap(model).named_modules()
                   if _is_row_layer(n) and isinstance(m, RowParallelLinear)), None)
    policy = gate.finish(group, hidden=hidden, codecs=[config.reduce_spec, *(s for _, s in config.override_specs)],
                         collectives=CompressedComm)  # every rank alike: their settings matched above
    comm = CompressedComm(group, policy, cuda_graphs=config.cuda_graphs)
    model = _unwrap(model)
    feedback = ErrorFeedback(comm.world_size) if config.error_feedback else None
    handle = CompressionHandle(comm, feedback)
    if feedback is not None:  # a debt belongs to one forward's rows
        handle._hooks.append(model.register_forward_pre_hook(lambda module, args: feedback.reset()))
    found = 0
    matched: set[str] = set()
    reselected: dict = {}  # (ratio, rule) -> the calibration's channels for them
    codecs: dict = {}  # one codec object per codec value: layers share its plans and gate answers
    try:
        for name, module in model.named_modules():
            parent, _, leaf = name.rpartition(".")
            if _is_row_layer(name):
                spec = None
                if leaf in config.layers:
                    matched.update(p for p, _ in config.override_specs if fnmatch.fnmatchcase(name, p))
                    spec = config.layer_spec(name)
                if spec is None and feedback is None:
                    continue
                _check_class(name, module, RowParallelLinear)
                codec = None  # exact; with error feedback on, it still pays the rank's debt
                if spec is not None:
                    params = None
                    if needs_calibration(spec):
                        calibration.check_matches(tp_size=comm.world_size, hidden=module.output_size,
                                                  model=config.model)
                        cal = calibration
                        if isinstance(spec, OutlierSpec):  # the spec's ratio, the config's rule
                            key = (spec.ratio, config.outlier_rule)
                            cal = reselected.get(key) or reselected.setdefault(
                                key, calibration.reselect(ratio=spec.ratio, rule=config.outlier_rule))
                        params = calibrated_params(spec, cal, name)
                    codec = make_codec(spec, params)
                    codec = codecs.setdefault(codec, codec)
                    found += 1
                norm = None if feedback is None else _post_norm(model.get_submodule(parent), name, module)
                handle._attach(module, CompressedRowParallelLinear, LayerCompression(comm, codec, feedback, norm))
            elif (config.gather_codec_spec is not None and leaf in GATHER_LAYERS
                  and parent.endswith(GATHER_LAYERS[leaf]) and getattr(module, "sequence_parallel", False)):
                _check_class(name, module, ColumnParallelLinear)
                codec = make_codec(config.gather_codec_spec)
                handle._attach(module, CompressedColumnParallelLinear,
                               LayerCompression(comm, codecs.setdefault(codec, codec)))
                found += 1
        unused = [p for p, _ in config.override_specs if p not in matched]
        if unused:
            raise ValueError(f"override pattern(s) {unused} match no compressed row-parallel layer "
                             "(names look like 'decoder.layers.3.mlp.linear_fc2')")
    except Exception:
        handle.remove()
        raise
    if found == 0:
        raise ValueError("no tensor-parallel layer to compress was found: expected modules named "
                         "'...self_attention.linear_proj' / '...mlp.linear_fc2' (Megatron GPTModel)")
    return handle


def compressed_layer_spec(layer_spec):
    """A copy of a transformer-layer `ModuleSpec` whose linear_proj / linear_fc2 (and linear_qkv /
    linear_fc1) use the compressible classes; compression stays off until applied."""
    spec = copy.deepcopy(layer_spec)
    subs = spec.submodules
    pairs = [(subs.self_attention.submodules, "linear_proj", RowParallelLinear, CompressedRowParallelLinear),
             (subs.mlp.submodules, "linear_fc2", RowParallelLinear, CompressedRowParallelLinear),
             (subs.self_attention.submodules, "linear_qkv", ColumnParallelLinear, CompressedColumnParallelLinear),
             (subs.mlp.submodules, "linear_fc1", ColumnParallelLinear, CompressedColumnParallelLinear)]
    for holder, attr, base, new in pairs:
        if getattr(holder, attr, None) is base:
            setattr(holder, attr, new)
    return spec
