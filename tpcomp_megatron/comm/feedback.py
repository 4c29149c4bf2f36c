"""Error feedback along depth: each rank carries its quantization error into its next reduction.

A pre-norm transformer (Llama, Mistral, SmolLM2) adds every row-parallel reduction straight into
one residual stream. A rank knows exactly how far its decoded contribution is from its true
partial sum, so it adds that difference, negated (its "debt"), to the partial sum it sends in the
*next* reduction. The errors then telescope: after any reduction the residual stream holds only
that reduction's error, not the sum of all earlier ones, and each error reaches a single sublayer's
input before it is paid back. Payloads and bits are unchanged; each rank keeps one activation-sized
float32 buffer.

The identity (tested on real ranks): the sum of all reductions' outputs so far equals the exact sum
minus the ranks' current debts. An exact reduction (the gate's fallback, or a layer left exact)
pays the whole debt.

Models that normalize a reduction's output before the residual add (Gemma 2/3's post-attention
and post-MLP norms) are not supported yet: there the debt must be kept in residual units, rescaled
by the next norm's gain and an estimate of the next output's RMS, and sent in small clamped steps
so the norm stays near-linear. A prototype of that halves Gemma 3 270M's KL
(benchmarks/experiments/feedback_postnorm_gemma.py; unclamped sends made it far worse).
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    """One rank's debt toward the residual stream, carried from reduction to reduction.

    `reset()` at the start of every forward (apply_tp_compression registers a model pre-hook; the
    simulation does the same): a debt belongs to the rows of one forward.
    """

    def __init__(self) -> None:
        self.debt: torch.Tensor | None = None  # float32 [rows, hidden]
        self.dropped = 0  # debts discarded because the next reduction had other rows

    def reset(self) -> None:
        self.debt = None

    def to_send(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 rows to send: this rank's partial sum plus its debt."""
        if self.debt is None:
            return rows.float()
        if self.debt.shape != rows.shape or self.debt.device != rows.device:
            self.dropped += 1  # another forward's rows (no reset between them): never mix them
            self.reset()
            return rows.float()
        return rows.float() + self.debt

    def settle(self, sent: torch.Tensor, contributed: torch.Tensor) -> None:
        """After a reduction: `sent` is what `to_send` returned (partial sum plus old debt),
        `contributed` what this rank's payload decoded to (its share of the output, float32);
        their difference is the new debt."""
        self.debt = sent - contributed
