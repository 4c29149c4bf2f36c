"""The deployment step: a `CompressionConfig` resolved against one model and one process group.

`read_inputs(config)` reads the files the configuration names, once (recipe, calibration: a
tool calls it before any heavy work, so a bad file is refused at once); `resolve(config, model,
group)` reads them where not given, and the gate's table, checks it all against the model (recipe
made for it, calibration of its hidden and TP sizes, layer classes) and returns a `Deployment`: the codec of every compressed
layer by its exact module name, the gate policy, the error-feedback choices, and the digest of
everything the ranks must agree on. A recipe is a saved deployment: its exact-name map becomes the
deployment's map as it is, and `to_recipe` turns a deployment back into one (`recipe.save_recipe`
writes it). `resolve` is collective (every rank of the group calls it): ranks whose
configuration, data or gate differ get a ValueError naming the difference instead of a hang, and
only then may the gate probe the group.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from ..calibration import Calibration, load_calibration
from ..codecs import OutlierSpec, calibrated_params, make_codec, needs_calibration, parse_codec_spec
from ..comm import CompressedComm, GatePolicy, check_same_config
from ..comm.feedback import PostNorm
from ..comm.gate.resolve import resolve as resolve_gate
from .config import GATHER_LAYERS, CompressionConfig, is_row_layer
from .layers import CompressedColumnParallelLinear, CompressedRowParallelLinear


@dataclass(frozen=True)
class Deployment:
    """What `apply_tp_compression` attaches (see the module docstring)."""

    group: object
    policy: GatePolicy | None
    """None: nothing compressed (the configuration turns compression off)."""
    reductions: dict
    """Row-parallel layer name -> its codec (None: exact, attached to pay the error-feedback debt)."""
    gathers: dict
    """Column-parallel layer name -> the codec of its sequence-parallel all-gather."""
    norms: dict
    """With error feedback: row-parallel layer name -> the post-norm its output passes (Gemma 2/3)."""
    error_feedback: bool = False
    cuda_graphs: bool = True
    digest: str = ""
    """sha256 (16 hex) of what the ranks agreed on: configuration, data, gate."""
    plan: dict = dataclasses.field(default_factory=dict)
    """Every row-parallel layer name -> its codec spec ('none': exact), as a recipe records it."""
    outlier_rule: str | None = None
    calibration: Calibration | None = None
    """The calibration the plan's codecs were made from (None when none needs one)."""

    @property
    def enabled(self) -> bool:
        return self.policy is not None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
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


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _recipe_settings(config: CompressionConfig, recipe) -> tuple[bool, str | None]:
    """(error feedback, outlier rule) of a run with `recipe`: the recipe's; a config field set to
    something else is a contradiction (equal values are none: dataclasses.replace passes them)."""
    for name, value, unset in (("error_feedback", recipe.error_feedback, False),
                               ("outlier_rule", recipe.outlier_rule, None)):
        if getattr(config, name) not in (unset, value):
            raise ValueError(f"recipe {config.recipe} sets {name}={value!r}, but {name}={getattr(config, name)!r} "
                             "was also given: the recipe is applied as one unit")
    return recipe.error_feedback, recipe.outlier_rule


@dataclass(frozen=True)
class Inputs:
    """The files a configuration names, read and validated (`read_inputs`)."""

    recipe: object | None
    """The loaded `recipe.Recipe`, or None."""
    calibration: Calibration | None
    data: str
    """Digest of the data the ranks must agree on ('none', 'recipe:<sha>', or the calibration's)."""


def read_inputs(config: CompressionConfig, calibration: Calibration | None = None) -> Inputs:
    """The recipe and calibration `config` names, each read once (`calibration`: already loaded)."""
    if config.recipe is not None:
        from ..recipe import load_recipe

        recipe = load_recipe(config.recipe)
        return Inputs(recipe, calibration or recipe.calibration, "recipe:" + _file_digest(config.recipe))
    if calibration is None and config.needs_calibration:
        calibration = load_calibration(config.calibration)
    return Inputs(None, calibration, "none" if calibration is None else calibration.digest())


def resolve(config: CompressionConfig, model: torch.nn.Module, group=None, *, inputs: Inputs | None = None,
            calibration: Calibration | None = None, model_config=None) -> Deployment:
    """`config` deployed on `model` over `group` (default: Megatron's tensor-parallel group);
    collective. `inputs`: `read_inputs(config)` done earlier (else done here, with `calibration`
    already loaded if given); `model_config` (the checkpoint's `models.LlamaModelConfig`,
    optional): a recipe's model fingerprint is then checked in full (architecture, vocab, config hash), not only the hidden
    size, layer count and layer names the built model shows."""
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    rows = [n for n in modules if is_row_layer(n)]
    inputs = inputs or read_inputs(config, calibration)
    feedback, rule, recipe, calibration = config.error_feedback, config.outlier_rule, inputs.recipe, inputs.calibration
    if recipe is not None:
        from ..recipe import model_fingerprint

        feedback, rule = _recipe_settings(config, recipe)
        mc = getattr(inner, "config", None)
        recipe.check(tp_size=dist.get_world_size(group), layer_names=rows, hidden=getattr(mc, "hidden_size", None),
                     num_layers=getattr(mc, "num_layers", None), model_name=config.model,
                     fingerprint=None if model_config is None else model_fingerprint(model_config),
                     where=f"recipe {config.recipe}")
        # exact names (recipe.check: the recipe names every row-parallel layer)
        specs = {n: parse_codec_spec(recipe.layers[n]) for n in rows if n.rpartition(".")[2] in config.layers}
    else:
        specs = {n: config.layer_spec(n) for n in rows if n.rpartition(".")[2] in config.layers}
        unused = [p for p, _ in config.override_specs if not any(fnmatch.fnmatchcase(n, p) for n in specs)]
        if unused:
            raise ValueError(f"override pattern(s) {unused} match no compressed row-parallel layer "
                             "(names look like 'decoder.layers.3.mlp.linear_fc2')")
    gate = resolve_gate(group, algorithm=config.algorithm, link=config.link, min_bytes=config.min_bytes,
                        transport=config.transport, table=config.gate_table,
                        probe=config.gate_probe if config.enabled else False)
    # the gate as resolved on this rank (e.g. the detected link class, the measured table's
    # identity, whether this rank refused it) is checked too: ranks that differ fail here
    text = f"{config.describe()} data={inputs.data} error_feedback={feedback} rule={rule} {gate.describe()}"
    check_same_config(text, group)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if gate.refusal:
        raise ValueError(gate.refusal)
    if not config.enabled:
        return Deployment(group, None, {}, {}, {}, digest=digest)
    world = dist.get_world_size(group)
    codecs: dict = {}  # one codec object per codec value: layers share its kits, graphs and gate answers
    reselected: dict = {}  # (ratio, rule) -> the calibration's channels for them
    reductions, norms = {}, {}
    for name in rows:
        spec, module = specs.get(name), modules[name]
        if spec is None and not feedback:
            continue
        _check_class(name, module, RowParallelLinear)
        codec = None  # exact; with error feedback on, it still pays the rank's debt
        if spec is not None:
            params = None
            if needs_calibration(spec):
                calibration.check_matches(tp_size=world, hidden=module.output_size, model=config.model)
                cal = calibration
                if isinstance(spec, OutlierSpec):  # the spec's ratio, the run's rule
                    key = (spec.ratio, rule)
                    cal = reselected.get(key) or reselected.setdefault(key, calibration.reselect(ratio=spec.ratio,
                                                                                                 rule=rule))
                params = calibrated_params(spec, cal, name)
            codec = make_codec(spec, params)
            codec = codecs.setdefault(codec, codec)
        reductions[name] = codec
        if feedback:
            norm = _post_norm(modules[name.rpartition(".")[0]], name, module)
            if norm is not None:
                norms[name] = norm
    gathers = {}
    if config.gather_codec_spec is not None:
        codec = make_codec(config.gather_codec_spec)
        codec = codecs.setdefault(codec, codec)
        for name, module in modules.items():
            parent, _, leaf = name.rpartition(".")
            if (leaf in GATHER_LAYERS and parent.endswith(GATHER_LAYERS[leaf])
                    and getattr(module, "sequence_parallel", False)):
                _check_class(name, module, ColumnParallelLinear)
                gathers[name] = codec
    if not any(c is not None for c in reductions.values()) and not gathers:
        raise ValueError("no tensor-parallel layer to compress was found: expected modules named "
                         "'...self_attention.linear_proj' / '...mlp.linear_fc2' (Megatron GPTModel)")
    hidden = next((modules[n].output_size for n in rows if isinstance(modules[n], RowParallelLinear)), None)
    used = dict.fromkeys(s for s in specs.values() if s is not None)  # the run's codec specs, once each
    # every rank alike: their settings matched above
    policy = gate.finish(group, hidden=hidden, codecs=[config.reduce_spec, *used], collectives=CompressedComm)
    plan = {n: str(specs.get(n) or "none") for n in rows}
    uses_calibration = any(needs_calibration(s) for s in specs.values() if s is not None)
    return Deployment(group, policy, reductions, gathers, norms, error_feedback=feedback,
                      cuda_graphs=config.cuda_graphs, digest=digest, plan=plan, outlier_rule=rule,
                      calibration=calibration if uses_calibration else None)


def to_recipe(deployment: Deployment, model_config, *, name: str | None = None, made_by: dict | None = None):
    """`deployment` as a `recipe.Recipe` for the model `model_config` describes (the checkpoint's
    `LlamaModelConfig`, `name` as calibration files record it): its plan by exact layer name, error
    feedback, outlier rule and calibration; `recipe.save_recipe` writes it, `CompressionConfig(recipe=...)`
    deploys it again."""
    from ..recipe import Recipe, model_fingerprint

    if not deployment.enabled:
        raise ValueError("a deployment that compresses nothing has no recipe")
    if deployment.gathers:
        raise ValueError("a recipe records the row-parallel reductions only; this deployment also compresses "
                         "sequence-parallel all-gathers (gather_spec)")
    return Recipe(model=model_fingerprint(model_config, name), tp_size=dist.get_world_size(deployment.group),
                  layers=dict(deployment.plan), error_feedback=deployment.error_feedback,
                  outlier_rule=deployment.outlier_rule, calibration=deployment.calibration,
                  made_by=dict(made_by or {}))

