"""The reduction step of a compressed all-reduce, shared by the collective and the simulation.

`reduce_payloads(codec, payloads, hidden, algorithm=...)` takes the payloads of every source
(ranks 0..n-1, in that order) for some rows and reduces them as the deployed algorithm does:
* one-shot: decode each and sum in float32 in rank order; the sum, in `dtype`, is the result
  every rank holds;
* two-shot: the chunk owner's step: the float32 sum requantized as the `REDUCED` source (the
  payload that is then all-gathered and decoded), and on request the requantization error
  (decoded minus sum, float32) that error feedback charges to the chunk's owner.
`CompressedComm.all_reduce` (collectives.py) calls it on the payloads a rank received;
`quality/simtp.py` on every simulated rank's payloads at once (rows are coded independently, so
reducing all rows together equals reducing each rank's chunk). One function: the simulation
cannot drift from what is deployed. (The collectives, `collectives.py`, launch the same
kernels through plans prepared once per row bucket; tests hold them to the reference bytes.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from ..codecs.base import REDUCED, Codec
from .transport import sources

def reduce_payloads(codec: Codec, payloads: torch.Tensor | Sequence[torch.Tensor], hidden: int, *,
                    algorithm: str, dtype: torch.dtype = torch.float32,
                    with_error: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(result, requantization error or None) of `payloads` `[n, rows, row_bytes]` (or a list of
    n `[rows, row_bytes]`, e.g. peers' symmetric-memory buffers): one-shot: (the sum in `dtype`,
    None); two-shot: (the reduced payload, the error if `with_error`, else None)."""
    n = len(payloads)
    if algorithm == "one_shot":
        if isinstance(payloads, torch.Tensor):
            return ops.decode_sum(codec, payloads, hidden, sources=sources(n), dtype=dtype), None
        return ops.decode_sum_list(codec, payloads, hidden, sources=sources(n), dtype=dtype), None
    if algorithm != "two_shot":
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; valid: 'one_shot', 'two_shot'")
    if not isinstance(payloads, torch.Tensor):
        payloads = torch.stack(list(payloads))
    if not with_error:  # one fused step
        return ops.decode_sum_encode(codec, payloads, hidden, sources=sources(n), out_source=REDUCED), None
    summed = ops.decode_sum(codec, payloads, hidden, sources=sources(n), dtype=torch.float32)
    reduced = ops.encode(codec, summed, source=REDUCED)
    decoded = ops.decode_each(codec, reduced.unsqueeze(0), hidden, sources=(REDUCED,), dtype=torch.float32)
    return reduced, decoded - summed
