"""A one-process, TP=1 Megatron world for the converter (writing and reading torch_dist).

A torch_dist checkpoint is reshardable: tensors are stored in their global layout, so one process
holding a TP=1 model with the padded shapes of the target TP writes the same checkpoint N ranks
would. This keeps conversion a single process (no rank spawning) and leaves no state behind.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from typing import Iterator

from tpcomp_megatron.megatron.cpu import cpu_megatron


@contextlib.contextmanager
def single_rank_megatron(seed: int = 1234) -> Iterator[None]:
    """A gloo world of one rank with Megatron parallel state at TP=1, on CPU; torn down on exit.

    Raises RuntimeError if this process already runs torch.distributed or Megatron parallel state
    (run the converter in its own process then).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if dist.is_initialized() or parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "torch.distributed / Megatron parallel state is already initialized in this process; "
            "run the checkpoint conversion in a separate process (tpcomp-convert)"
        )
    with tempfile.TemporaryDirectory(prefix="tpcomp-convert-") as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group(
            "gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(minutes=30)
        )
        try:
            # The converter is CPU work even on a GPU machine: nothing here touches CUDA.
            with cpu_megatron(allow_with_cuda=True):
                parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
                try:
                    tensor_parallel.model_parallel_cuda_manual_seed(seed)
                    yield
                finally:
                    parallel_state.destroy_model_parallel()
        finally:
            dist.destroy_process_group()
