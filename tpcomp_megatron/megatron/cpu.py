"""Run Megatron-core on CPU (gloo) inside a scoped, undoable context.

Megatron-core assumes CUDA in a few places that a CPU run cannot avoid: tensors allocated with
`device=torch.cuda.current_device()` (GPTModel, sequence-parallel mappings, rotary embedding,
dist_checkpointing), `torch.cuda.synchronize()` (dist_checkpointing, parallel_state), the CUDA RNG
tracker that `DotProductAttention` forks around dropout even when dropout is 0, and the default
causal mask (allocated on "cuda" by name) used when no attention mask is passed. `cpu_megatron()`
replaces exactly those three for the duration of a `with` block and puts the originals back on exit,
even when the block raises. Everything else (linears, attention, checkpoints) runs unchanged.

It refuses to start when CUDA is available: on a GPU Megatron must run as it is, so a CPU shim can
never leak into the GPU path. Code that runs on both uses `megatron_device_context(device)`.

The local spec's `WrappedTorchNorm` refuses `sequence_parallel=True`; models that need sequence
parallelism on CPU use `tpcomp_megatron.models.core.norm.RMSNorm` (the model builder does).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator

import torch

__all__ = ["CpuRNGStatesTracker", "cpu_megatron", "cpu_megatron_active", "megatron_device_context"]

# What is replaced, by module and name; the same in megatron-core 0.16.1 and 0.19.2.
# `get_cuda_rng_tracker()` returns the tracker global once the "initialized" flag is True, and every
# Megatron module reaches the tracker only through that function, so setting both is enough.
_RANDOM_MODULE = "megatron.core.tensor_parallel.random"
_TRACKER_ATTR = "_CUDA_RNG_STATE_TRACKER"
_TRACKER_READY_ATTR = "_CUDA_RNG_STATE_TRACKER_INITIALIZED"
# The causal softmax builds its default mask with device="cuda"; fused_softmax imported it by name.
_SOFTMAX_MODULE = "megatron.core.fusions.fused_softmax"
_CAUSAL_MASK_ATTR = "get_default_causal_mask"


class CpuRNGStatesTracker:
    """The CPU counterpart of Megatron's `CudaRNGStatesTracker`: named RNG states for `fork()`.

    Same public methods (`reset`, `get_states`, `set_states`, `add`, `fork`), backed by the CPU
    generator, so `model_parallel_cuda_manual_seed` and dropout under `fork()` behave as on GPU:
    a forked region draws from its own seeded stream and leaves the default stream untouched.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked; use a distinct seed per state")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists; call reset() first")
        self.seeds_.add(seed)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(
                f"RNG state {name!r} was never added; call "
                "megatron.core.tensor_parallel.model_parallel_cuda_manual_seed(seed) first"
            )
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_current_device() -> torch.device:
    # Megatron passes this to `device=` and `.to()`, where a torch.device works like an index.
    return torch.device("cpu")


def _no_synchronize(device: Any = None) -> None:
    # CPU ops complete before they return; nothing to wait for.
    return None


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    # Megatron's version allocates on "cuda" by name; True marks the masked (future) positions.
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def cpu_megatron_active() -> bool:
    """True inside a `cpu_megatron()` block."""
    return torch.cuda.current_device is _cpu_current_device


def _megatron_module(name: str, attrs: tuple[str, ...]) -> Any:
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        raise RuntimeError(
            f"cpu_megatron() needs {name} from megatron-core: "
            "pip install 'megatron-core>=0.16.1,<0.20'"
        ) from e
    missing = [a for a in attrs if not hasattr(mod, a)]
    if missing:
        version = getattr(importlib.import_module("megatron.core"), "__version__", "unknown")
        raise RuntimeError(
            f"megatron-core {version} no longer has {missing} in {name}, which cpu_megatron() "
            "replaces; it supports 0.16.1 to 0.19.x (update tpcomp_megatron/megatron/cpu.py)"
        )
    return mod


@contextlib.contextmanager
def cpu_megatron(*, allow_with_cuda: bool = False) -> Iterator[CpuRNGStatesTracker]:
    """Let Megatron-core run on CPU inside the block; everything is restored on exit.

    Yields the CPU RNG tracker that Megatron's `get_cuda_rng_tracker()` returns inside the block.
    Nested use is allowed: an inner block reuses the outer one's state and undoes nothing.
    Raises RuntimeError when CUDA is available (use Megatron unmodified there), unless
    `allow_with_cuda=True`: only for CPU-side tools (checkpoint conversion) that never put a Megatron
    tensor on the GPU in that process.
    """
    if torch.cuda.is_available() and not allow_with_cuda:
        raise RuntimeError(
            "cpu_megatron() is for machines without CUDA; on a GPU run Megatron as it is "
            "(megatron_device_context(torch.device('cuda')) does nothing)"
        )
    random_mod = _megatron_module(_RANDOM_MODULE, (_TRACKER_ATTR, _TRACKER_READY_ATTR))
    softmax_mod = _megatron_module(_SOFTMAX_MODULE, (_CAUSAL_MASK_ATTR,))
    if cpu_megatron_active():
        yield getattr(random_mod, _TRACKER_ATTR)
        return

    tracker = CpuRNGStatesTracker()
    saved: list[tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", torch.cuda.current_device),
        (torch.cuda, "synchronize", torch.cuda.synchronize),
        (random_mod, _TRACKER_ATTR, getattr(random_mod, _TRACKER_ATTR)),
        (random_mod, _TRACKER_READY_ATTR, getattr(random_mod, _TRACKER_READY_ATTR)),
        (softmax_mod, _CAUSAL_MASK_ATTR, getattr(softmax_mod, _CAUSAL_MASK_ATTR)),
    ]
    replacements: list[Any] = [
        _cpu_current_device,
        _no_synchronize,
        tracker,
        True,
        _cpu_causal_mask,
    ]
    try:
        for (obj, name, _), new in zip(saved, replacements, strict=True):
            setattr(obj, name, new)
        yield tracker
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def megatron_device_context(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """`cpu_megatron()` for a CPU device, a no-op context for CUDA: one call site for both paths."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return cpu_megatron()
    if dev.type == "cuda":
        return contextlib.nullcontext()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {dev.type!r}")
