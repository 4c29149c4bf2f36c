"""One tensor-parallel rank's real work in one process, for benchmarks and tests.

Rank 0 of a TP group of N runs exactly its own compute and host work (its weight shards, its
kernels, the whole compressed path: gate, encode, transport call, decode, stats) while its peers
exist only in the process group:

* `mirror` (`MirrorProcessGroup`, below, the default): every peer is taken to hold exactly what
  this rank holds, so a collective returns what N real ranks with equal inputs would get
  (all-gather: N copies of the input; all-to-all: this rank's own chunk from every peer;
  reductions: N times the input), in one kernel on this rank's stream, as a real collective is
  one kernel: the link is excluded, all the rest of one rank's work is real, and the model sees
  real numbers, not garbage. For tests too: the compressed path's output can be compared with real
  multi-rank runs, and a path that skips a collective gives a different answer.
* `fake` (torch's FakeProcessGroup): returns at once, but unevenly: its all-reduce does nothing,
  while its all-gather and all-to-all copy the input into every peer's slot, one kernel per peer
  (N launches of host time), and outputs otherwise hold whatever memory held. It favours the
  exact all-reduce over any path that all-gathers; kept to compare with earlier measurements.

    with one_rank_tp(2, backend="mirror", device=torch.device("cuda")):
        model = build_gpt_model(cfg)  # a TP=2 shard
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch.futures import Future

BACKENDS = ("mirror", "fake")


class _Done(dist._Work):
    """A finished collective (its result is already in place)."""

    def __init__(self, result=None):
        super().__init__()
        self._future = Future()
        self._future.set_result(result)

    def wait(self, timeout=None) -> bool:
        return True

    def get_future(self) -> Future:
        return self._future


class MirrorProcessGroup(dist.ProcessGroup):
    """A group of `world` ranks in which every peer holds what this rank holds (see the module
    docstring); the collectives the compressed path and Megatron call, on any device."""

    def __init__(self, rank: int, world: int):
        super().__init__(rank, world)
        self._done = _Done()  # one finished Work serves every call (nothing is ever pending)

    def getBackendName(self) -> str:
        return "mirror"

    def allreduce(self, tensors, opts=None):
        for t in tensors:
            t.mul_(self.size())  # sum of N equal terms (ReduceOp.SUM; Megatron asks no other here)
        return self._done

    def allgather(self, output_lists, inputs, opts=None):  # the list form (all_gather_object)
        for outs, inp in zip(output_lists, inputs):
            for out in outs:
                out.copy_(inp)
        return self._done

    def all_gather_single(self, out, inp, opts=None):
        out.view(self.size(), -1).copy_(inp.reshape(1, -1))
        return self._done

    _allgather_base = all_gather_single  # the name torch < 2.12 calls

    def allgather_into_tensor_coalesced(self, outs, inps, opts=None):
        for o, i in zip(outs, inps):
            self.all_gather_single(o, i)
        return self._done

    def alltoall_base(self, out, inp, output_split_sizes, input_split_sizes, opts=None):
        if output_split_sizes or input_split_sizes:
            raise NotImplementedError("mirror process group: all-to-all with uneven splits")
        n = self.size()
        out.view(n, -1).copy_(inp.reshape(n, -1)[self.rank()].unsqueeze(0))
        return self._done

    def reduce_scatter_single(self, out, inp, opts=None):
        n = self.size()
        torch.mul(inp.reshape(n, -1)[self.rank()].view_as(out), n, out=out)
        return self._done

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outs, inps, opts=None):
        for o, i in zip(outs, inps):
            self.reduce_scatter_single(o, i)
        return self._done

    def broadcast(self, tensors, opts=None):
        return self._done

    def barrier(self, opts=None):
        return self._done


def register_mirror_backend() -> None:
    """Make "mirror" a process-group backend of this process (`init_process_group("mirror", ...)`)."""
    if "mirror" not in dist.Backend.backend_list:
        dist.Backend.register_backend(
            "mirror", lambda common, _opts: MirrorProcessGroup(common.group_rank, common.group_size),
            extended_api=True, devices=["cpu", "cuda"])


@contextlib.contextmanager
def mirror_group(world_size: int) -> Iterator[None]:
    """The default process group of this process: rank 0 of `world_size` in a mirror group (no
    Megatron state; `one_rank_tp` adds it), torn down on exit."""
    register_mirror_backend()
    dist.init_process_group("mirror", store=dist.HashStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def one_rank_tp(world_size: int, *, backend: str = "mirror", device: torch.device | str = "cpu",
                seed: int = 1234) -> Iterator[None]:
    """Rank 0 of a TP group of `world_size` in this process: the default process group and
    Megatron's model-parallel state (TP = `world_size`, no gloo groups, its RNG seeded with
    `seed`), torn down on exit. On CPU Megatron runs inside the project's CPU adapter
    (`megatron_device_context`)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tpcomp_megatron.megatron.cpu import megatron_device_context

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {list(BACKENDS)}")
    if dist.is_initialized():
        raise RuntimeError("one_rank_tp needs a process without a default process group")
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        store = FakeStore()
    else:
        register_mirror_backend()
        store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=world_size)
    try:
        with megatron_device_context(torch.device(device)):
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size,
                                                     create_gloo_process_groups=False)
            try:
                model_parallel_cuda_manual_seed(seed)
                yield
            finally:
                parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()
