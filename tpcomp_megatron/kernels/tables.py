"""Device-side tables the outlier kernels read, derived once per codec and device.

`OutlierParams` live on the CPU and the reference moves them per call; a kernel call must not
(a host-to-device copy per call costs time and breaks CUDA-graph capture). The tables are built on
the first call for a device and memoized on the codec instance itself, so they live and die with
the codec and no module holds state. Make that first call before capturing a CUDA graph (the
warm-up call that compiles the kernels does it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_MEMO_ATTR = "_tpcomp_kernel_tables"
_MAX_LOG2_TILE = 16  # column tiles are powers of two up to 2**16 (see launch.choose_tiles)


@dataclass(frozen=True)
class OutlierTables:
    lo: torch.Tensor  # float32 [sources, hidden]
    step: torch.Tensor  # float32 [sources, hidden]
    inv: torch.Tensor  # float32 [sources, hidden]: inv_step, 0 on outlier channels
    slot: torch.Tensor  # int16 [hidden]: outlier slot of each channel, -1 for the others (int16: read
    #                   beside bf16 data, 8 lanes per access, in the same register layout)
    chan: torch.Tensor  # int32 [k]: channel of each slot
    first: torch.Tensor  # int32 [hidden + 1]: number of outlier channels below each column
    window_max: tuple[int, ...]  # [p]: most outlier channels in one aligned window of 2**p columns

    @property
    def sources(self) -> int:
        return self.lo.shape[0]


def _build(params, device: torch.device) -> OutlierTables:
    hidden = params.hidden
    chan = params.channels.to(torch.int64).cpu()
    k = chan.numel()
    if k and (chan.min() < 0 or chan.max() >= hidden):
        raise ValueError(f"outlier channels must lie in [0, {hidden}); got {chan.min()}..{chan.max()}")
    if torch.unique(chan).numel() != k:
        raise ValueError("outlier channels must be distinct (the kernels map each channel to one slot)")
    if k > torch.iinfo(torch.int16).max:
        raise ValueError(f"{k} outlier channels: the kernels' slot table holds at most 32767")
    slot = torch.full((hidden,), -1, dtype=torch.int16)
    slot[chan] = torch.arange(k, dtype=torch.int16)
    first = torch.zeros(hidden + 1, dtype=torch.int32)
    first[1:] = torch.cumsum((slot >= 0).to(torch.int32), 0)
    window_max = tuple(int(torch.bincount(chan >> p).max()) if k else 0 for p in range(_MAX_LOG2_TILE + 1))
    inv = params.inv_step.to(torch.float32).clone()
    inv[:, chan] = 0.0
    return OutlierTables(
        lo=params.lo.to(device=device, dtype=torch.float32).contiguous(),
        step=params.step.to(device=device, dtype=torch.float32).contiguous(),
        inv=inv.to(device).contiguous(),
        slot=slot.to(device),
        chan=chan.to(device=device, dtype=torch.int32),
        first=first.to(device),
        window_max=window_max,
    )


def outlier_tables(codec, device: torch.device) -> OutlierTables:
    """The device tables of an outlier codec (memoized on `codec`)."""
    memo = codec.__dict__.setdefault(_MEMO_ATTR, {})
    key = str(device)
    if key not in memo:
        memo[key] = _build(codec.params, device)
    return memo[key]


def tile_slots(window_max: Sequence[int], cols: int) -> int:
    """KT: a power of two >= the most outlier slots that fall in one column tile of `cols`."""
    p = cols.bit_length() - 1
    if cols != 1 << p or p >= len(window_max):
        raise ValueError(f"column tile {cols} is not a power of two up to {1 << (len(window_max) - 1)}")
    return max(2, 1 << max(0, (window_max[p] - 1).bit_length()))


def source_row(source: int, sources: int) -> int:
    """Table row of `source` (Python indexing, as the reference's `lo[source]`: -1 = REDUCED)."""
    if not isinstance(source, int) or not -sources <= source < sources:
        raise ValueError(f"source {source!r} out of range: the calibration has {sources} rows "
                         f"(ranks 0..{sources - 2}, and -1 for the reduced sum)")
    return source % sources


def source_progression(sources: Sequence[int], n_tables: int) -> tuple[int, int] | None:
    """(first row, row step) when the sources' table rows form an arithmetic progression
    (range(n), [REDUCED] * n, ...), else None."""
    rows = [source_row(int(s), n_tables) for s in sources]
    step = rows[1] - rows[0] if len(rows) > 1 else 0
    if all(b - a == step for a, b in zip(rows, rows[1:])):
        return rows[0], step
    return None
