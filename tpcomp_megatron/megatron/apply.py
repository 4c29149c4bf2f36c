"""Put compression on a built Megatron `GPTModel`, and take it off again.

`apply_tp_compression(model, config)` deploys `config` on the model (`deploy.resolve`: the codec
of every row-parallel `linear_proj` (attention) / `linear_fc2` (MLP) and, with a gather codec
under sequence parallelism, every column-parallel `linear_qkv` / `linear_fc1`, by exact name) and
attaches it; given a `Deployment`, it only attaches. Layers built from a spec made by
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

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from ..calibration import Calibration
from ..comm import CompressedComm
from ..comm.feedback import ErrorFeedback
from .config import CompressionConfig
from .deploy import Deployment, resolve, unwrap
from .layers import CompressedColumnParallelLinear, CompressedRowParallelLinear
from .mappings import LayerCompression


class CompressionHandle:
    """Undo record of `apply_tp_compression`; also exposes the communicator's counters."""

    def __init__(self, comm: CompressedComm | None, feedback: ErrorFeedback | None = None):
        self.comm = comm
        self.feedback = feedback
        self._changed: list[tuple[torch.nn.Module, type]] = []
        self._names: list[str] = []
        self._hooks: list = []

    @property
    def stats(self):
        return None if self.comm is None else self.comm.stats

    @property
    def attached(self) -> set[str]:
        return set(self._names)

    def capture_graphs(self, max_tokens: int) -> int:
        """Capture now the CUDA graphs of every compressed collective the attached layers make,
        for prompts (or batches) of up to `max_tokens` tokens, as a server's start-up does
        (`CompressedComm.capture_graphs`): after it, a prompt length never seen replays a graph
        captured here instead of capturing one. Returns the graphs captured (0 on the CPU or
        with graphs off). Collective: every rank of the group calls it with the same
        `max_tokens`. Layers with error feedback take no graph."""
        if self.comm is None:
            return 0
        wanted = {}
        for module, _ in self._changed:
            lc = module.tp_compression
            if lc is None or lc.codec is None or lc.feedback is not None:
                continue
            if isinstance(module, CompressedRowParallelLinear):
                op = "reduce_scatter" if module.sequence_parallel else "all_reduce"
                hidden, rows = module.output_size, max_tokens
            else:  # a sequence-parallel gather: each rank holds 1/n of the tokens
                op, hidden, rows = "all_gather", module.input_size, max_tokens // self.comm.world_size
            wanted[(op, lc.codec, hidden, module.weight.dtype, module.weight.device)] = rows
        return sum(self.comm.capture_graphs(*key, rows) for key, rows in wanted.items())

    def _attach(self, module: torch.nn.Module, compressed_cls: type, lc: LayerCompression, name: str = "") -> None:
        self._changed.append((module, type(module)))
        self._names.append(name)
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
        self._names.clear()


def apply_tp_compression(model: torch.nn.Module, config: CompressionConfig | Deployment, *, group=None,
                         calibration: Calibration | None = None, model_config=None) -> CompressionHandle:
    """Attach compression to `model`'s tensor-parallel layers; returns a handle with `remove()`.

    Collective: every rank of `group` (default: Megatron's tensor-parallel group) must call it;
    ranks given different configurations get a ValueError here instead of a hang later. A
    `CompressionConfig` is deployed first (`deploy.resolve`, which takes `group`, `calibration` and
    `model_config`); a `Deployment` (resolved for this model) is attached as it is.
    """
    deployment = config if isinstance(config, Deployment) else resolve(
        config, model, group, calibration=calibration, model_config=model_config)
    if not deployment.enabled:
        return CompressionHandle(None)
    comm = CompressedComm(deployment.group, deployment.policy, cuda_graphs=deployment.cuda_graphs)
    model = unwrap(model)
    feedback = ErrorFeedback(comm.world_size) if deployment.error_feedback else None
    handle = CompressionHandle(comm, feedback)
    if feedback is not None:  # a debt belongs to one forward's rows
        handle._hooks.append(model.register_forward_pre_hook(lambda module, args: feedback.reset()))
    try:
        for name, module in model.named_modules():
            if name in deployment.reductions:
                lc = LayerCompression(comm, deployment.reductions[name], feedback, deployment.norms.get(name))
                handle._attach(module, CompressedRowParallelLinear, lc, name)
            elif name in deployment.gathers:
                handle._attach(module, CompressedColumnParallelLinear, LayerCompression(comm, deployment.gathers[name]),
                               name)
        missing = (deployment.reductions.keys() | deployment.gathers.keys()) - handle.attached
        if missing:
            raise ValueError(f"deployment names layer(s) {sorted(missing)[:3]} this model does not have: "
                             "resolve it for this model")
    except Exception:
        handle.remove()
        raise
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
