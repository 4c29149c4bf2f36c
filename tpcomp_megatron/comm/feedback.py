"""Error feedback along depth: each rank carries its quantization error into its next reduction.

A pre-norm transformer (Llama, Mistral, SmolLM2) adds every row-parallel reduction straight into
one residual stream. A rank knows exactly how far its decoded contribution is from its true
partial sum, so it adds that difference, negated (its "debt"), to the partial sum it sends in the
*next* reduction. The errors then telescope: after any reduction the residual stream holds only
that reduction's error, not the sum of all earlier ones, and each error reaches a single sublayer's
input before it is paid back. Payloads and bits are unchanged; each rank keeps one activation-sized
float32 buffer. The identity (tested on real ranks): the sum of all reductions' outputs so far
equals the exact sum minus the ranks' current debts. An exact reduction (the gate's fallback, or a
layer left exact) pays the whole debt.

Post-norm models (Gemma 2/3) normalize a reduction's output S before the residual add:
`residual += gain * S / rms(S)`. There a debt is kept in residual units: an error e in a rank's
contribution to S reaches the residual stream through the norm's Jacobian, `gain / rms(S)` times
e less its projection onto S (first order; without the projection the residual error and the
debts disagree by 60% on synthetic rows dominated by one channel, against 9% with it).
Paying it back through the next reduction means sending `debt * rms(S') / gain'`, where rms(S')
of the output not yet formed is estimated as sqrt(ranks) x the rank's own partial-sum RMS
(partials of different ranks are nearly uncorrelated; it needs no calibration; a rank holding
only padding heads sends nothing back there and pays in the next layer). Sends are capped
at CLAMP_FRACTION of their block's largest partial-sum magnitude, the remainder staying owed: a
large send moves the norm's RMS and breaks the first-order step (uncapped sends made Gemma 3 270M
far worse; see benchmarks/results/quality_cpu-amd-epyc_2026-11-23.md). Channels whose gain is
near zero cannot pay anything back and keep their debt. The output RMS needs the whole output row,
so post-norm feedback works with all-reduce, not with sequence-parallel reduce-scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLAMP_FRACTION = 0.1
"""A post-norm send may move a value by at most this fraction of its block's largest |partial|
(0.05-0.25 measured on Gemma 3 270M: 0.1 best, 0.05 close)."""
CLAMP_BLOCK = 32
"""Values per clamp block, along the hidden dimension."""
FUSED_COST = {"one_shot": 1.7, "two_shot": 2.7}
"""A rank's codec work with pre-norm feedback fused into the encode (`ops.encode_feedback`) over
its work without feedback, per all-reduce algorithm; H100, 8 sources, 8-128 MB, FP4/b32/E6M2
(FP6/b32/E8M0): one-shot 1.45-1.70x (1.32-1.49x), separate steps took 3.4-4.5x
(feedback_fused_h100_2026-11-24.jsonl); two-shot 2.1-2.7x (2.0-2.4x), its plain work being
smaller (feedback_two_shot_h100_2026-11-24.jsonl). Reduce-scatter, two-shot's first half, takes
the two-shot figure."""
POST_NORM_COST = 8.2
"""Through a post-norm (separate, compiled steps; any algorithm): 6.3-8.2x for FP4/b32/E6M2, same
file."""
_PROBE = 1.0e3  # norm(PROBE * ones) = gain * PROBE / sqrt(PROBE^2 + eps): the gain to ~1e-12


def feedback_cost(norm: PostNorm | None, algorithm: str = "one_shot") -> float:
    """How many times a rank's plain codec work feedback makes it (the gate's `extra_cost`)."""
    return POST_NORM_COST if norm is not None else FUSED_COST.get(algorithm, max(FUSED_COST.values()))


@dataclass(frozen=True)
class PostNorm:
    """The RMSNorm a reduction's output passes before the residual add, as error feedback sees it."""

    gain: torch.Tensor
    """float32 [hidden]: the norm's effective per-channel scale (Gemma: 1 + weight)."""
    eps: float
    inv_gain: torch.Tensor
    """float32 [hidden]: 1 / gain, 0 where |gain| < 1e-3 x its median (no debt is paid there)."""

    @classmethod
    def probe(cls, norm: torch.nn.Module, hidden: int) -> PostNorm:
        """Read the effective gain of an RMSNorm-like module (any weight convention) by running it
        on a constant row; its eps from `eps` / `variance_epsilon` (1e-6 if it has neither; None,
        as torch.nn.RMSNorm's default, means float32's machine epsilon)."""
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
        eps = float(torch.finfo(torch.float32).eps if eps is None else eps)
        param = next(norm.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        what = f"{type(norm).__name__} is not an RMSNorm over {hidden} channels"
        try:
            with torch.no_grad():
                gain = norm(torch.full((1, hidden), _PROBE, dtype=torch.float32, device=device))
        except RuntimeError as e:
            raise ValueError(f"{what}: {e}") from e
        gain = gain.reshape(-1).float()
        if gain.shape != (hidden,) or not torch.isfinite(gain).all():
            raise ValueError(f"{what}: probing it gave shape {tuple(gain.shape)} (or non-finite values)")
        gain = gain * (1.0 + eps / _PROBE**2) ** 0.5
        usable = gain.abs() > 1e-3 * gain.abs().median()
        inv = torch.where(usable, 1.0 / torch.where(usable, gain, torch.ones_like(gain)), torch.zeros_like(gain))
        return cls(gain=gain, eps=eps, inv_gain=inv)

    def send(self, debt: torch.Tensor, raw: torch.Tensor, ranks: int) -> torch.Tensor:
        """`raw` [rows, hidden] (this rank's partial sum) plus what pays `debt` (residual units)."""
        return _fused(_send, raw, debt, self.inv_gain, float(ranks) ** 0.5)

    def settle(self, debt: torch.Tensor | None, contributed: torch.Tensor, raw: torch.Tensor,
               output: torch.Tensor) -> torch.Tensor:
        """The debt after a reduction whose output rows are `output`, in which this rank's
        contribution moved from `raw` to `contributed`: the move, mapped through the norm's
        Jacobian `gain / r * (I - y y^T / (hidden r^2))` (y the output, r = sqrt(mean(y^2) + eps)),
        is paid off the old debt."""
        if debt is None:
            debt = torch.zeros_like(raw)
        return _fused(_settle, debt, contributed, raw, output, self.gain, self.eps)


def _send(raw: torch.Tensor, debt: torch.Tensor, inv_gain: torch.Tensor, sqrt_ranks: float) -> torch.Tensor:
    out_rms = raw.pow(2).mean(-1, keepdim=True).sqrt() * sqrt_ranks
    limit = CLAMP_FRACTION * _block_absmax(raw, CLAMP_BLOCK)
    return raw + torch.minimum(torch.maximum(debt * out_rms * inv_gain, -limit), limit)


def _settle(debt: torch.Tensor, contributed: torch.Tensor, raw: torch.Tensor, output: torch.Tensor,
            gain: torch.Tensor, eps: float) -> torch.Tensor:
    step = contributed - raw
    y = output.float()
    ms = y.pow(2).mean(-1, keepdim=True) + eps
    along = (y * step).sum(-1, keepdim=True) / (y.shape[-1] * ms)
    return debt - (step - y * along) * (gain / ms.sqrt())


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each value's block maximum of |x| (blocks of `block` along the last dim; a short last block)."""
    h = x.shape[-1]
    blocks = F.pad(x.abs(), (0, -h % block)).view(*x.shape[:-1], -1, block)
    return blocks.amax(-1, keepdim=True).expand_as(blocks).reshape(*x.shape[:-1], -1)[..., :h]


_COMPILED: dict = {}


def _fused(fn, *args):
    """`fn(*args)`; on CUDA tensors through `fn` compiled once by torch.compile (Inductor fuses its
    ~12 elementwise passes and row reductions into a few Triton kernels). The CPU and CUDA results
    agree to float32 rounding, not bit for bit: their row sums run in other orders."""
    if not args[0].is_cuda:
        return fn(*args)
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn](*args)


class ErrorFeedback:
    """One rank's debt toward the residual stream, carried from reduction to reduction.

    `reset()` at the start of every forward (apply_tp_compression registers a model pre-hook; the
    simulation does the same): a debt belongs to the rows of one forward. `ranks`: the group size.
    Every `to_send` is followed by one `settle` of the same reduction; a fused encode
    (`ops.encode_feedback`, pre-norm only) takes `debt_buffer` instead of both.
    """

    def __init__(self, ranks: int) -> None:
        if not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        self.ranks = ranks
        self.debt: torch.Tensor | None = None  # float32 [rows, hidden], residual units
        self.dropped = 0  # debts discarded because the next reduction had other rows
        self._pending: tuple[torch.Tensor, PostNorm | None] | None = None

    def reset(self) -> None:
        self.debt = None

    def _match(self, rows: torch.Tensor) -> None:
        if self.debt is not None and (self.debt.shape != rows.shape or self.debt.device != rows.device):
            self.dropped += 1  # another forward's rows (no reset between them): never mix them
            self.reset()

    def debt_buffer(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 debt for a fused pre-norm encode of `rows` (`ops.encode_feedback` sends
        rows + debt and updates it in place, so no `to_send` / `settle` pair): zeros at first."""
        self._match(rows)
        if self.debt is None:
            self.debt = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        return self.debt

    def to_send(self, rows: torch.Tensor, norm: PostNorm | None = None) -> torch.Tensor:
        """The float32 rows to send: this rank's partial sum plus its debt (`norm`: the post-norm
        the reduction's output passes, None where it is added straight into the residual)."""
        raw = rows.float()
        self._pending = (raw, norm)
        self._match(rows)
        if self.debt is None:
            return raw
        if norm is None:
            return raw + self.debt
        return norm.send(self.debt, raw, self.ranks)

    def settle(self, sent: torch.Tensor, contributed: torch.Tensor, output: torch.Tensor | None = None) -> None:
        """After a reduction: `sent` is what `to_send` returned, `contributed` what this rank's
        payload decoded to (its share of the output, float32), `output` the reduction's output
        rows (needed with a post-norm, whose RMS converts the change to residual units)."""
        if self._pending is None:
            raise RuntimeError("ErrorFeedback.settle without a to_send before it")
        raw, norm = self._pending
        self._pending = None
        if norm is None:
            self.debt = sent - contributed
            return
        if output is None:
            raise ValueError("settling a post-norm reduction needs its output rows (for the norm's RMS)")
        self.debt = norm.settle(self.debt, contributed, raw, output)
