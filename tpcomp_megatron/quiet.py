"""Quiet by default: the warnings of Megatron-core and torch that a user of this project cannot act on.

    with quiet_warnings(enabled=not args.verbose):
        ...                                   # imports and runs; the filters go when the block ends

Each entry names the warning by its category, the module that raises it and the start of its
message, so anything else (a warning of ours, a new one from a library) still shows. The filters
live in a `warnings.catch_warnings()` block: leaving it restores the previous filters exactly.
Processes started inside the block (the gloo ranks the tools spawn, the converter's subprocess)
get the same messages through PYTHONWARNINGS, which names no module (its module field must match
exactly): category and message start only. Importing this module imports nothing heavy, so it can
wrap the Megatron imports themselves; `run_quietly` does so for the console scripts (console.py).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


VERBOSE_HELP = "also show Megatron's and torch's warnings that do not concern this run (hidden by default)"


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
    """Hide the `noise` warnings inside the block, here and in the processes started in it
    (`enabled` False: change nothing)."""
    before = os.environ.get("PYTHONWARNINGS")
    with warnings.catch_warnings():
        if enabled:
            for n in noise:
                warnings.filterwarnings("ignore", message=re.escape(n.message), category=n.category, module=n.module)
            # PYTHONWARNINGS splits on ',' and ':': a message holding one is left to the parent's filter
            own = [f"ignore:{n.message}:{n.category.__name__}" for n in noise if not set(",:") & set(n.message)]
            os.environ["PYTHONWARNINGS"] = ",".join(([before] if before else []) + own)
        try:
            yield
        finally:
            if enabled:
                if before is None:
                    os.environ.pop("PYTHONWARNINGS", None)
                else:
                    os.environ["PYTHONWARNINGS"] = before


@contextlib.contextmanager
def no_progress_bars(enabled: bool = True) -> Iterator[None]:
    """No Hugging Face progress bars ("Loading weights") inside the block, where transformers is
    installed (`enabled` False: change nothing); the previous setting comes back after it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    if not enabled or hf_logging is None:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def run_quietly(module: str, argv: list[str] | None = None) -> int:
    """Import `module` and return its `main(argv)` with the noise hidden, imports included
    (the console scripts' entry; `--verbose` in the arguments: hidden nothing)."""
    args = sys.argv[1:] if argv is None else argv
    with quiet_warnings(enabled="--verbose" not in args):
        return importlib.import_module(module).main(argv)
