"""EXPERIMENTAL, simulation only: a block codec applied after a fixed randomized Hadamard rotation.

`tpcomp-eval-quality --rotation G` (records name the codec `rot<G>+<block spec>`, e.g.
`rot64+fp4_e2m1/b32/e8m0`; no runtime spec: nothing can deploy it): each rank multiplies its partial sum
by R = diag(signs) x blockdiag(H_G) (H_G: normalized Hadamard of size G, signs from a fixed seed,
the same on every rank), block-quantizes it, and the receiver rotates the decoded sum back with
R^T. R is orthogonal and linear, so the exact sum is unchanged; the rotation spreads a block's
outlier channels over G channels and makes blocks near-Gaussian, which block codecs quantize
far better. Payload bits are those of the block codec (the rotation sends nothing).

There is no kernel or collective for this: it is measured here to show what such a codec would buy
(see benchmarks/results/quality_cpu-amd-epyc_2026-11-23.md) before anyone builds one.
"""

from __future__ import annotations

import torch

from ..codecs import BlockSpec, make_codec
from ..codecs.base import Codec

PREFIX = "rot"
SEED = 0x5EED


def hadamard(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).float()


def check_rotation(group: int, spec) -> None:
    """A rotation of size `group` goes in front of a block codec spec."""
    if not isinstance(group, int) or group < 2 or group & (group - 1):
        raise ValueError(f"rotation size {group!r} must be a power of two >= 2")
    if not isinstance(spec, BlockSpec):
        raise ValueError(f"{spec}: a rotation goes in front of a block codec, not an outlier or low-rank one")


class RotatedBlockCodec(Codec):
    """A block codec on `x @ R`; decoding returns to the original basis."""

    def __init__(self, inner: BlockSpec, group: int, hidden: int):
        check_rotation(group, inner)
        spec = f"{PREFIX}{group}+{inner}"
        if hidden % group:
            raise ValueError(f"{spec}: hidden size {hidden} is not a multiple of the rotation size {group}")
        self.spec = spec
        self.inner = make_codec(inner)
        signs = torch.randint(0, 2, (hidden,), generator=torch.Generator().manual_seed(SEED)).float() * 2 - 1
        self.rot = torch.block_diag(*[hadamard(group)] * (hidden // group)) * signs[:, None]
        self.hidden = hidden

    def row_bytes(self, hidden: int) -> int:
        return self.inner.row_bytes(hidden)

    def ineligible(self, hidden: int) -> str | None:
        if hidden != self.hidden:
            return f"rotation built for hidden size {self.hidden}, got {hidden}"
        return self.inner.ineligible(hidden)

    def bits_per_value(self, hidden: int) -> float:
        return self.inner.bits_per_value(hidden)

    def encode(self, x: torch.Tensor, *, source: int = 0) -> torch.Tensor:
        self.check_input(x)
        return self.inner.encode(x.float() @ self.rot, source=source)

    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        return self.inner.decode_f32(payload, hidden, source=source) @ self.rot.T

    def decode_sum_f32(self, payloads: torch.Tensor, hidden: int, sources=None) -> torch.Tensor:
        # Rotate back once, after the sum, as a kernel would.
        return self.inner.decode_sum_f32(payloads, hidden, sources) @ self.rot.T
