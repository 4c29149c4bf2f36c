"""Quiet by default: the warnings of Megatron-core and torch that a user of this project cannot act on.

    with quiet_warnings(enabled=not args.verbose):
        ...                                   # imports and runs; the filters go when the block ends

Each entry names the warning by its category, the module that raises it and the start of its
message, so anything else (a warning of ours, a new one from a library) still shows. The filters
live in a `warnings.catch_warnings()` block: leaving it restores the previous filters exactly.
Importing this module imports nothing heavy, so it can wrap the Megatron imports themselves.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    """One warning to hide: category, raising module (regex) and message start (text)."""

    category: type[Warning]
    module: str
    message: str
    why: str
    """Why the user cannot act on it here."""


NOISE = (
    Noise(UserWarning, r"megatron\.core\.", "Transformer Engine and Apex are not installed",
          "inference with the local layer spec needs neither"),
    Noise(UserWarning, r"megatron\.core\.", "Apex is not installed. Falling back to Torch Norm",
          "the torch norm is the one the local spec uses"),
    Noise(UserWarning, r"megatron\.core\.transformer\.transformer_config", "full scope is deprecated",
          "Megatron's own default of cuda_graph_scope"),
    Noise(UserWarning, r"megatron\.core\.tensor_parallel\.layers",
          "When using async grad allreduce it is recommended",
          "about training: inference runs no gradient all-reduce"),
    Noise(FutureWarning, r"megatron\.core\.dist_checkpointing\.", "`load_state_dict` is deprecated",
          "Megatron's checkpoint loader calls torch's old API"),
    Noise(FutureWarning, r"torch\.distributed\.", "Please use DTensor instead and we are deprecating ShardedTensor",
          "Megatron's torch_dist checkpoints are ShardedTensors"),
    Noise(FutureWarning, r"torch\.distributed\.", "`torch.distributed.all_gather_into_tensor` is deprecated",
          "the name Megatron and this project call; it still works on every backend"),
)


@contextlib.contextmanager
def quiet_warnings(enabled: bool = True, noise: tuple[Noise, ...] = NOISE) -> Iterator[None]:
    """Hide the `noise` warnings inside the block (`enabled` False: change nothing)."""
    with warnings.catch_warnings():
        if enabled:
            for n in noise:
                warnings.filterwarnings("ignore", message=re.escape(n.message), category=n.category, module=n.module)
        yield
