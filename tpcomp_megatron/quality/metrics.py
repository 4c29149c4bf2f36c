"""Quality metrics of a compressed model against the same model uncompressed, on the same tokens.

* perplexity: exp(mean next-token negative log-likelihood over the scored tokens);
* top-1 agreement: fraction of scored positions whose argmax equals the uncompressed argmax;
* KL: mean over scored positions of KL(P_uncompressed || P_compressed), in nats.
Sums are kept in float64; log-softmax runs in float32 over row chunks, so a 262k-entry vocabulary
(Gemma 3) does not need gigabytes at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROW_CHUNK = 128


@dataclass
class Totals:
    """Running sums for one configuration."""

    nll: float = 0.0
    tokens: int = 0
    agree: int = 0
    kl: float = 0.0
    diff: float = 0.0
    """Sum over tokens of NLL(compressed) - NLL(uncompressed)."""
    diff_sq: float = 0.0
    """Sum of its squares (for the standard error of the paired difference)."""
    nonfinite: str | None = None
    """Where logits first held NaN or inf (window and first non-finite module), or None: the
    figures are then NaN and say nothing (inference/finite.py)."""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")

    @property
    def mean_kl(self) -> float:
        return self.kl / self.tokens if self.tokens else float("nan")

    def ppl_increase_se_pct(self) -> float:
        """Standard error of the perplexity increase, in percent, from the per-token paired NLL
        differences taken as independent. Neighbouring tokens are correlated, so this is a lower
        bound on the noise: read differences of less than about 2-3 SE as unresolved."""
        n = self.tokens
        if n < 2:
            return float("nan")
        mean = self.diff / n
        var = max(self.diff_sq / n - mean * mean, 0.0) * n / (n - 1)
        return 100.0 * math.exp(mean) * math.sqrt(var / n)


def _rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not line up")
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def add_reference(totals: Totals, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Score the uncompressed model's logits (agreement with itself is 1, KL 0)."""
    lg, tg = _rows(logits, targets)
    for s in range(0, lg.shape[0], ROW_CHUNK):
        lp = torch.log_softmax(lg[s:s + ROW_CHUNK].float(), dim=-1)
        totals.nll -= lp.gather(1, tg[s:s + ROW_CHUNK, None]).double().sum().item()
    totals.tokens += tg.numel()
    totals.agree += tg.numel()


def add_compared(totals: Totals, logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Score compressed `logits` and compare them with the uncompressed `ref_logits`."""
    lg, tg = _rows(logits, targets)
    ref, _ = _rows(ref_logits, targets)
    if ref.shape != lg.shape:
        raise ValueError(f"reference logits {tuple(ref.shape)} differ in shape from {tuple(lg.shape)}")
    for s in range(0, lg.shape[0], ROW_CHUNK):
        lq = torch.log_softmax(lg[s:s + ROW_CHUNK].float(), dim=-1)
        lp = torch.log_softmax(ref[s:s + ROW_CHUNK].float(), dim=-1)
        nll_q = -lq.gather(1, tg[s:s + ROW_CHUNK, None]).double()
        d = nll_q + lp.gather(1, tg[s:s + ROW_CHUNK, None]).double()
        totals.nll += nll_q.sum().item()
        totals.diff += d.sum().item()
        totals.diff_sq += d.square().sum().item()
        totals.kl += (lp.exp() * (lp - lq)).sum(-1).double().sum().item()
        totals.agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
    totals.tokens += tg.numel()
