"""Outlier-channel codecs after arXiv 2411.07942: reference implementation.

A layer's row-parallel partial sums carry a few consistently large feature channels. A calibrated
set of k channels (`OutlierParams.channels`) travels in bf16; every other channel is coded low-bit.

Static (`outlier_int4/k<N>`), row payload:

    [ 4-bit codes of all `hidden` channels, packed 2 per byte, low nibble first ]
    [ k outlier values, bf16 little-endian, in `channels` order ]

Codes are unsigned: value = lo[c] + q * step[c], q in 0..15, with calibrated per-channel, per-source
`lo`/`step` (bf16-representable, so `q * step` is exact and kernels match bit for bit). Outlier
channels keep a dead code 0 in the low-bit part: it costs 4k bits per row and spares the kernels a
channel compaction. NaN/Inf policy: the codes have no spare value, so a row holding any non-finite
value sends NaN in all its outlier slots and decodes to NaN across that row (token) only.

Hybrid (`outlier+<block spec>/k<N>`), row payload:

    [ block codec payload of the row with its outlier channels set to zero ]
    [ k outlier values, bf16 ]

Zeroing the outliers lets their blocks take a small scale. NaN/Inf follow the block codec's
per-block rule; outlier values pass through bf16 unchanged.
"""

from __future__ import annotations

import torch

from ..calibration import OutlierParams
from .base import Codec
from .block import BlockCodec
from .formats import pack_codes, unpack_codes
from .spec import OutlierSpec


def _bf16_to_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.bfloat16).contiguous().view(torch.uint8)


def _bytes_to_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).to(torch.float32)


class _OutlierCodecBase(Codec):
    def __init__(self, spec: OutlierSpec, params: OutlierParams):
        if not isinstance(params, OutlierParams):
            raise ValueError(f"{spec} needs calibrated OutlierParams (see tools/calibrate.py), got {type(params)}")
        self.spec = spec
        self.params = params
        self.k = params.channels.numel()

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.params.channels, self.params.lo, self.params.step)

    def _check_hidden(self, hidden: int) -> str | None:
        if hidden != self.params.hidden:
            return f"calibration is for hidden size {self.params.hidden}, the tensor has {hidden}"
        return None

    def bits_per_value(self, hidden: int) -> float:
        return (self.row_bytes(hidden) * 8) / hidden

    def _outlier_bytes(self, x: torch.Tensor) -> torch.Tensor:
        return _bf16_to_bytes(x[:, self.params.channels.to(x.device)]).reshape(x.shape[0], 2 * self.k)

    def _scatter_outliers(self, vals: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        out = _bytes_to_f32(tail.reshape(tail.shape[0], self.k, 2)).reshape(tail.shape[0], self.k)
        vals[:, self.params.channels.to(vals.device)] = out
        return vals


class StaticOutlierCodec(_OutlierCodecBase):
    """`outlier_int4/k<N>`: bf16 outliers + static per-channel 4-bit codes."""

    LEVELS = 15

    def ineligible(self, hidden: int) -> str | None:
        if hidden % 2:
            return f"hidden size {hidden} must be even for 4-bit packing"
        return self._check_hidden(hidden)

    def row_bytes(self, hidden: int) -> int:
        return hidden // 2 + 2 * self.k

    def encode(self, x: torch.Tensor, *, source: int = 0) -> torch.Tensor:
        self.check_input(x)
        xf = x.to(torch.float32)
        lo, inv = self.params.lo[source].to(x.device), self.params.inv_step[source].to(x.device)
        q = torch.round((xf - lo) * inv).clamp(0, self.LEVELS)
        q = torch.nan_to_num(q, nan=0.0)
        q[:, self.params.channels.to(x.device)] = 0
        bad = ~torch.isfinite(xf).all(dim=1, keepdim=True)
        outl = torch.where(bad, float("nan"), xf[:, self.params.channels.to(x.device)])
        return torch.cat([pack_codes(q.to(torch.uint8), 4), _bf16_to_bytes(outl).reshape(x.shape[0], -1)], 1)

    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        q = unpack_codes(payload[:, : hidden // 2], 4, hidden).to(torch.float32)
        lo, step = self.params.lo[source].to(payload.device), self.params.step[source].to(payload.device)
        vals = self._scatter_outliers(lo + q * step, payload[:, hidden // 2:])
        bad = torch.isnan(vals[:, self.params.channels.to(payload.device)]).any(dim=1, keepdim=True)
        return torch.where(bad, float("nan"), vals)


class HybridCodec(_OutlierCodecBase):
    """`outlier+<block spec>/k<N>`: bf16 outliers + a dynamic block codec for the rest."""

    def __init__(self, spec: OutlierSpec, params: OutlierParams):
        super().__init__(spec, params)
        self.block = BlockCodec(spec.base)

    def ineligible(self, hidden: int) -> str | None:
        return self.block.ineligible(hidden) or self._check_hidden(hidden)

    def row_bytes(self, hidden: int) -> int:
        return self.block.row_bytes(hidden) + 2 * self.k

    def encode(self, x: torch.Tensor, *, source: int = 0) -> torch.Tensor:
        self.check_input(x)
        rest = x.clone()
        rest[:, self.params.channels.to(x.device)] = 0
        return torch.cat([self.block.encode(rest), self._outlier_bytes(x)], dim=1)

    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        n = self.block.row_bytes(hidden)
        vals = self.block.decode_f32(payload[:, :n], hidden)
        return self._scatter_outliers(vals, payload[:, n:])
