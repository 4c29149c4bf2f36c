"""Compressed collectives on any `torch.distributed` process group (gloo or NCCL), any world size.

Every function takes the local tensor `[..., hidden]`, compresses rows of `hidden` values, and
returns a new tensor; the gate sends ineligible calls to the exact collective instead.

* all-reduce, one-shot: encode own partial sum, all-gather the N payloads, decode-and-sum in rank
  order. Each rank sends (N-1) payloads.
* all-reduce, two-shot: encode (rows padded to a multiple of N), all-to-all so rank i holds every
  rank's chunk i, decode-sum-requantize chunk i, all-gather the chunks, decode. Each rank sends
  2(N-1)/N payloads.
* reduce-scatter (sequence parallelism, along dim 0): encode, all-to-all, decode-sum own chunk.
* all-gather (sequence parallelism, along dim 0): encode own shard, all-gather, decode all.

With an `ErrorFeedback` state (`feedback.py`) a rank sends its partial sum plus its debt
and settles the debt from what its payload decoded to; the exact fallback carries the debt too.
Pre-norm feedback (all-reduce, reduce-scatter) does both inside the encode
(`ops.encode_feedback`). The gate asks feedback's extra work to pay too (`feedback_cost`).

Each algorithm is written once (below) over a `Kit` (`engine.py`): the set-up state of its
collective for one (codec value, hidden, dtypes, stream, row bucket), kernel plans and payload
buffers, shared by every layer and every prompt length of the bucket; the same code runs eager,
under CUDA-graph capture (buffers allocated per call) and under torch.compile (traced ops). Per
exact shape the gate's answer is cached (`_MAX_ANSWERS`, the oldest dropped first), and eager
CUDA calls without error feedback replay a CUDA graph of their collective, one per padded row
count, from its second call on (`graphs.py`: a forward's layers and nearby prompt lengths share one).

Sums run in float32 in rank order, and every rank decodes the same payloads (its own included),
so all-reduce results are bit-identical on every rank. Failures of the underlying collective (a
peer died, a timeout) raise `CollectiveError` naming the operation and the group.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

from .. import ops
from ..codecs.base import Codec
from ..log import log_once
from .feedback import ErrorFeedback, PostNorm, feedback_cost
from .gate import GatePolicy, ineligible
from .gate.links import symm_mem_available
from . import transport
from .reduce import reduce_payloads
from .engine import BUDGET_BYTES, Kits, call_mode
from .graphs import Graphs, graph_row_counts, padded_rows
from .stats import CommStats
from .transport import CollectiveError, ring_bytes as _ring_bytes, run as _run


EXACT_LAYER = "layer left exact"
_MAX_ANSWERS = 4096  # cached gate answers (exact shapes) per communicator


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


class CompressedComm:
    """Compressed collectives over one process group, with a gate policy and counters."""

    def __init__(self, group=None, policy: GatePolicy | None = None, *, keep_buffers: bool = True,
                 cuda_graphs: bool = True):
        """`keep_buffers`: keep payload buffers between calls within `engine.BUDGET_BYTES`; False:
        allocate them per call (the same bytes). `cuda_graphs`: eager CUDA calls replay a CUDA
        graph of their collective, one per padded row count, from its second call on (`graphs.py`;
        the same kernels, the same result); False: every call launches its steps."""
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._policy = policy if policy is not None else GatePolicy()
        self._policy.check_group(self.group)  # a measured table from another setup is refused
        self.stats = CommStats()
        self._symm = None  # SymmMemTransport, created on the first one-shot call that can use it
        self._symm_wanted = self._policy.transport == "symm_mem"
        if self._symm_wanted:
            why = symm_mem_available(self.group)  # the same answer on every rank (backend, torch)
            if why:
                log_once(f"symmetric-memory transport unavailable ({why}): one-shot payloads go through "
                          "NCCL's all-gather")
                self._symm_wanted = False
        self._gate: OrderedDict = OrderedDict()  # (op, shape, dtype, codec, cost) -> the gate's answer
        self._algorithm = self._policy.choose_algorithm(self.world_size)
        self.kits = Kits(self.world_size, self.rank, budget=BUDGET_BYTES if keep_buffers else 0)
        self.graphs = Graphs(self.world_size) if cuda_graphs else None

    @property
    def policy(self) -> GatePolicy:
        """The gate policy (fixed for the communicator's life: the gate's answers are cached)."""
        return self._policy

    def _why(self, op: str, x: torch.Tensor, codec: Codec | None, extra: float) -> tuple:
        """(the gate's answer for this call (`ineligible`), the bytes this rank sends compressed,
        the bytes the exact collective would send), computed once per (op, shape, dtype, codec,
        extra cost): the policy is frozen, so none of them can change."""
        key = (op, x.shape, x.dtype, codec, extra)
        got = self._gate.get(key)
        if got is None:
            if len(self._gate) >= _MAX_ANSWERS:  # shapes without bound (varying prompts): oldest out
                self._gate.popitem(last=False)
            got = self._gate[key] = self._answer(op, x, codec, extra)
        return got

    def _answer(self, op: str, x: torch.Tensor, codec: Codec | None, extra: float) -> tuple:
        n, nbytes = self.world_size, x.numel() * x.element_size()
        if codec is None:
            why = EXACT_LAYER
        elif op == "reduce_scatter" and x.dim() < 2:
            why = "1-D tensor (a reduce-scatter splits its elements, not rows)"
        else:
            why = ineligible(x, codec, n, self.policy, rows_divisible=op == "reduce_scatter",
                             extra_cost=extra, algorithm="two_shot" if op == "two_shot" else "one_shot",
                             op="all_reduce" if op in ("one_shot", "two_shot") else op)
        if why:
            return why, 0, 0
        rows, row_bytes = x.numel() // x.shape[-1], codec.row_bytes(x.shape[-1])
        if op == "one_shot":
            sent, exact = (n - 1) * rows * row_bytes, _ring_bytes(nbytes, n, "all_reduce")
        elif op == "two_shot":
            sent, exact = 2 * (n - 1) * (-(-rows // n)) * row_bytes, _ring_bytes(nbytes, n, "all_reduce")
        elif op == "reduce_scatter":
            sent, exact = (n - 1) * rows * row_bytes // n, _ring_bytes(nbytes, n, "reduce_scatter")
        elif op == "all_gather":
            sent, exact = (n - 1) * rows * row_bytes, nbytes * (n - 1)
        else:
            raise ValueError(f"unknown all-reduce algorithm {op!r}; valid: 'one_shot', 'two_shot'")
        return None, sent, exact

    def _symm_transport(self):
        """The symmetric-memory transport (called only when `_symm_wanted`: asked for, and it can run)."""
        if self._symm is None:
            from .symm import SymmMemTransport

            self._symm = SymmMemTransport(self.group)
        return self._symm

    # -- exact fallbacks ---------------------------------------------------------------------
    def _exact_all_reduce(self, x: torch.Tensor, reason: str, in_place: bool = False) -> torch.Tensor:
        out = x if in_place and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
        _run("all-reduce (exact fallback)", self.group, dist.all_reduce, out)
        self.stats.record_fallback(reason, _ring_bytes(x.numel() * x.element_size(), self.world_size, "all_reduce"))
        return out

    def _exact_reduce_scatter(self, x: torch.Tensor, reason: str) -> torch.Tensor:
        n = self.world_size
        if x.shape[0] % n:
            raise ValueError(f"reduce-scatter needs the first dimension ({x.shape[0]}) divisible by the world size {n}")
        out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
        _run("reduce-scatter (exact fallback)", self.group, dist.reduce_scatter_tensor, out, x.contiguous())
        self.stats.record_fallback(reason, _ring_bytes(x.numel() * x.element_size(), n, "reduce_scatter"))
        return out

    def _exact_all_gather(self, x: torch.Tensor, reason: str) -> torch.Tensor:
        n = self.world_size
        out = x.new_empty((x.shape[0] * n,) + tuple(x.shape[1:]))
        _run("all-gather (exact fallback)", self.group, transport.all_gather, out.view(-1), x.contiguous().view(-1))
        self.stats.record_fallback(reason, x.numel() * x.element_size() * (n - 1))
        return out

    # -- compressed collectives --------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor, codec: Codec | None, *, algorithm: str | None = None,
                   feedback: ErrorFeedback | None = None, norm: PostNorm | None = None,
                   in_place: bool = False) -> torch.Tensor:
        """Sum of `x` over the group; returns a new tensor of `x`'s shape and dtype (`codec` None:
        exact, for a layer left exact that still pays its error-feedback debt; `norm`: the
        post-norm the output passes before the residual add, for error feedback; `in_place`: `x`
        is not needed after the call, and the exact collective (or a replayed graph) may write the
        sum into it and return it, as Megatron's own mapping does)."""
        n = self.world_size
        if n == 1:
            return x
        algo = algorithm or self._algorithm
        if algo not in ("one_shot", "two_shot"):
            raise ValueError(f"unknown all-reduce algorithm {algo!r}; valid: 'one_shot', 'two_shot'")
        extra = 1.0 if feedback is None else feedback_cost(norm, algo)
        why, sent, exact = self._why(algo, x, codec, extra)
        if why and (feedback is None or x.dim() == 0 or x.numel() == 0):  # nothing owed on no rows
            return self._exact_all_reduce(x, why, in_place)
        rows = _rows(x)
        # Pre-norm feedback folds into the encode (send, encode, settle: one kernel).
        fused = feedback is not None and norm is None and not why
        send = rows if feedback is None or fused else feedback.to_send(rows, norm)
        if why:
            exact_in = send.to(x.dtype)
            out = self._exact_all_reduce(exact_in, why)
            if feedback is not None:  # an exact sum pays the debt (but for the rounding to x.dtype)
                feedback.settle(send, exact_in.float(), out)
            return out.view(x.shape)
        want_own = feedback is not None and not fused
        debt = feedback.debt_buffer(rows) if fused else None
        mode, stream = call_mode(x)
        run = self._one_shot if algo == "one_shot" else self._two_shot
        if feedback is None and not (algo == "one_shot" and self._symm_wanted):
            into = rows if in_place and rows.data_ptr() == x.data_ptr() else None
            out = self._graphed(algo, rows, codec, x.dtype, mode, stream, into,
                                lambda r, mode, s, out=None: run(r, codec, x.dtype, False, None, mode, s, out)[0])
            self.stats.record_compressed(sent, exact)
            return x if out is into else out.view(x.shape)  # (replayed in place: x holds the sum)
        out, own = run(send, codec, x.dtype, want_own, debt, mode, stream)
        if want_own:
            feedback.settle(send, own, out)
        self.stats.record_compressed(sent, exact)
        return out.view(x.shape)

    def _graphed(self, op: str, rows: torch.Tensor, codec: Codec, dtype: torch.dtype, mode: str, stream: int,
                 into: torch.Tensor | None, body) -> torch.Tensor:
        """`body(rows, mode, stream, out=None)` (a collective without error feedback), replayed from
        the CUDA graph of its padded row count where it can be (`graphs.py`: eager CUDA calls), else
        run; into `into` when given and replayed (the caller's buffer, `rows`' size)."""
        if self.graphs is not None and mode == "eager" and self.graphs.serves(rows.device):
            out = self.graphs.run(op, codec, rows, dtype, stream, body, into)
            if out is not None:
                return out
        return body(rows, mode, stream)

    def capture_graphs(self, op: str, codec: Codec, hidden: int, dtype: torch.dtype, device: torch.device,
                       max_rows: int) -> int:
        """Capture now the CUDA graphs of `op` ('all_reduce', 'reduce_scatter', 'all_gather') with
        `codec` on `hidden`-wide `dtype` rows, for every graph row count up to `max_rows` input
        rows (a reduce-scatter's whole input; an all-gather's shard), as a server's start-up does,
        so no request pays a capture; returns how many were captured (0 without graphs, on the CPU,
        or for a codec not padded). Largest first, so the static buffers are sized once. Collective: every rank calls it
        alike (the calls run the collective on zeros); the counters are left as they were."""
        calls = {"all_reduce": self.all_reduce, "reduce_scatter": self.reduce_scatter, "all_gather": self.all_gather}
        if op not in calls:
            raise ValueError(f"unknown collective {op!r}; valid: {sorted(calls)}")
        graphs = self.graphs
        if graphs is None or self.world_size == 1 or not codec.pads_rows_exactly or not graphs.serves(device):
            return 0  # (a codec whose graphs are per exact row count captures as it goes)
        before, stats = graphs.captured, self.stats
        self.stats = CommStats()
        try:
            kind = self._algorithm if op == "all_reduce" else op  # as `graphs.py` names them
            for rows in graph_row_counts(kind, max_rows, self.world_size):
                if padded_rows(kind, rows, self.world_size, True) * hidden * dtype.itemsize > graphs.max_input:
                    continue  # stays stepped
                x = torch.zeros((rows, hidden), dtype=dtype, device=device)
                for _ in range(2):  # the first sight, then the capture
                    calls[op](x, codec)
        finally:
            self.stats = stats
        return graphs.captured - before

    def _kit(self, op: str, rows: torch.Tensor, codec: Codec, dtype: torch.dtype, mode: str, stream: int):
        return self.kits.get(op, codec, rows.shape[0], rows.shape[1], rows.dtype, dtype, rows.device, stream,
                             traced=mode == "traced")

    def _own(self, codec: Codec, payload: torch.Tensor, hidden: int, source: int) -> torch.Tensor:
        return ops.decode_each(codec, payload.unsqueeze(0), hidden, sources=[source], dtype=torch.float32)

    def _encode(self, kit, codec: Codec, rows: torch.Tensor, out: torch.Tensor, debt: torch.Tensor | None):
        """This rank's payload of `rows` (plus `debt`, pre-norm error feedback, settled in place) into `out`."""
        if debt is None:
            return kit.encode(rows, out)
        return ops.encode_feedback(codec, rows, debt, source=self.rank, out=out)

    def _one_shot(self, rows: torch.Tensor, codec: Codec, dtype: torch.dtype, want_own: bool,
                  debt: torch.Tensor | None, mode: str, stream: int,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the sum, into `out` when given (not over symmetric memory), and with `want_own` what this
        rank's payload decodes to in float32). With a `debt` (pre-norm error feedback), `rows + debt`
        is sent and the debt updated in place."""
        m, hidden = rows.shape
        symm = self._symm_transport() if self._symm_wanted and rows.is_cuda else None
        if symm is not None:  # payloads written into peers' symmetric memory, read where they lie
            shape = (m, codec.row_bytes(hidden))
            symm.ensure(shape[0] * shape[1])
            views = symm.peer_views(shape)
            symm.barrier()  # peers are done reading the previous call's payloads
            if debt is None:
                ops.encode(codec, rows, source=self.rank, out=views[self.rank])
            else:
                ops.encode_feedback(codec, rows, debt, source=self.rank, out=views[self.rank])
            symm.barrier()  # every payload is written
            own = self._own(codec, views[self.rank], hidden, self.rank) if want_own else None
            return reduce_payloads(codec, views, hidden, algorithm="one_shot", dtype=dtype)[0], own
        kit = self._kit("one_shot", rows, codec, dtype, mode, stream)
        payload, flat, gathered = kit.buffers(m, fresh=mode != "eager")
        self._encode(kit, codec, rows, payload, debt)
        own = self._own(codec, payload, hidden, self.rank) if want_own else None
        _run("all-reduce (one-shot all-gather)", self.group, transport.gather_fn(mode == "traced"), flat, payload)
        return kit.decode_sum(gathered, out=out), own

    def _two_shot(self, rows: torch.Tensor, codec: Codec, dtype: torch.dtype, want_own: bool,
                  debt: torch.Tensor | None, mode: str, stream: int,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `_one_shot` (`out` used where the rows split evenly); this rank's own share also
        carries its chunk's requantization error (with `debt`: taken off the debt after the fused
        encode has settled the rest). Rows that do not split evenly are padded to n equal chunks:
        the padding rows' payloads (whatever the buffer holds: rows are coded independently) are
        reduced and decoded, then dropped."""
        n, (m, hidden) = self.world_size, rows.shape
        chunk = -(-m // n)
        kit = self._kit("two_shot", rows, codec, dtype, mode, stream)
        padded, payload, received_flat, received, gathered_flat, gathered = kit.buffers(m, fresh=mode != "eager")
        self._encode(kit, codec, rows, payload, debt)
        traced = mode == "traced"
        _run("all-reduce (two-shot all-to-all)", self.group, transport.all_to_all_fn(traced), received_flat, padded)
        own = None
        if debt is None and not want_own:
            reduced = kit.reduce(received)
        else:  # this rank owns its chunk's requantization error (unfused, same bytes)
            reduced, requant = reduce_payloads(codec, received, hidden, algorithm="two_shot", with_error=True)
            lo = self.rank * chunk
            hi = min(lo + chunk, m)
            if debt is not None:
                if hi > lo:
                    debt[lo:hi] -= requant[:hi - lo]
            else:
                own = self._own(codec, payload, hidden, self.rank)
                if hi > lo:
                    own[lo:hi] += requant[:hi - lo]
        _run("all-reduce (two-shot all-gather)", self.group, transport.gather_fn(traced), gathered_flat, reduced)
        if chunk * n == m:
            return kit.decode_each(gathered, out=out), own
        return kit.decode_each(gathered)[:m], own

    def reduce_scatter(self, x: torch.Tensor, codec: Codec | None, *, feedback: ErrorFeedback | None = None,
                       norm: PostNorm | None = None) -> torch.Tensor:
        """Sum over the group, split along dim 0: rank r gets rows [r*s/N, (r+1)*s/N)."""
        if feedback is not None and norm is not None:
            raise ValueError("error feedback through a post-norm needs every output row (the norm's RMS): "
                             "use all-reduce, not the sequence-parallel reduce-scatter")
        n = self.world_size
        if n == 1:
            return x
        if x.dim() == 0:
            raise ValueError("reduce-scatter splits along dim 0: a 0-d tensor has none")
        extra = 1.0 if feedback is None else feedback_cost(None, "two_shot")  # its first half
        why, sent, exact = self._why("reduce_scatter", x, codec, extra)
        if why and (feedback is None or x.numel() == 0):
            return self._exact_reduce_scatter(x, why)
        rows = _rows(x)
        if why:
            send = rows if feedback is None else feedback.to_send(rows)
            exact_in = send.to(x.dtype)
            out = self._exact_reduce_scatter(exact_in.view(x.shape), why)
            if feedback is not None:
                feedback.settle(send, exact_in.float())
            return out.view((x.shape[0] // n,) + tuple(x.shape[1:]))
        mode, stream = call_mode(x)
        if feedback is None:
            out = self._graphed("reduce_scatter", rows, codec, x.dtype, mode, stream, None,
                                lambda r, mode, s, out=None: self._reduce_scatter(r, codec, x.dtype, None, mode, s,
                                                                                  out))
        else:  # feedback (pre-norm here) folds into the encode
            out = self._reduce_scatter(rows, codec, x.dtype, feedback.debt_buffer(rows), mode, stream)
        self.stats.record_compressed(sent, exact)
        return out.view((x.shape[0] // n,) + tuple(x.shape[1:]))

    def _reduce_scatter(self, rows: torch.Tensor, codec: Codec, dtype: torch.dtype, debt: torch.Tensor | None,
                        mode: str, stream: int, out: torch.Tensor | None = None) -> torch.Tensor:
        kit = self._kit("reduce_scatter", rows, codec, dtype, mode, stream)
        payload, received_flat, received = kit.buffers(rows.shape[0], fresh=mode != "eager")
        self._encode(kit, codec, rows, payload, debt)
        _run("reduce-scatter (all-to-all)", self.group, transport.all_to_all_fn(mode == "traced"), received_flat,
             payload)
        return kit.decode_sum(received, out=out)

    def all_gather(self, x: torch.Tensor, codec: Codec) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's `x` (each rank's shard is decoded too, so all
        ranks hold the same tensor)."""
        n = self.world_size
        if n == 1:
            return x
        if x.dim() == 0:
            raise ValueError("all-gather concatenates along dim 0: a 0-d tensor has none")
        why, sent, exact = self._why("all_gather", x, codec, 1.0)
        if why:
            return self._exact_all_gather(x, why)
        rows = _rows(x)
        mode, stream = call_mode(x)
        out = self._graphed("all_gather", rows, codec, x.dtype, mode, stream, None,
                            lambda r, mode, s, out=None: self._all_gather(r, codec, x.dtype, mode, s, out))
        self.stats.record_compressed(sent, exact)
        return out.view((x.shape[0] * n,) + tuple(x.shape[1:]))

    def _all_gather(self, rows: torch.Tensor, codec: Codec, dtype: torch.dtype, mode: str, stream: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        kit = self._kit("all_gather", rows, codec, dtype, mode, stream)
        payload, flat, gathered = kit.buffers(rows.shape[0], fresh=mode != "eager")
        kit.encode(rows, payload)
        _run("all-gather", self.group, transport.gather_fn(mode == "traced"), flat, payload)
        return kit.decode_each(gathered, out=out)
