"""A greedy generation loop over a Megatron `GPTModel` with Megatron's static KV cache.

Used on CPU, where `megatron.core.inference` engines cannot run (they need CUDA events and
streams), and by the TTFT benchmark, which wants prefill and decode timed separately. Every rank
of the tensor-parallel group runs the same loop on the same tokens; logits are gathered across
the vocab shards (`parallel_output=False`) so every rank picks the same token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: torch.Tensor  # [batch, new_tokens]
    ttft_s: float  # prefill (prompt forward) time: time to the first token
    decode_s: float  # time of the remaining steps
    first_logits: torch.Tensor  # [batch, vocab] float32 logits of the first generated token
    nonfinite_step: int | None = None
    """The first generated token (1 = the first) whose logits held NaN or inf, or None."""

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * steps / self.decode_s if steps and self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, max_new_tokens: int, *, vocab_size: int,
                    eos_id: int | None = None) -> Generation:
    """Greedy-decode `max_new_tokens` after `prompt` [batch, seq]; `vocab_size` trims padded vocab.

    Stops early only when every sequence emitted `eos_id`, so all ranks take the same steps.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, s = prompt.shape
    device = prompt.device
    ctx = StaticInferenceContext(b, s + max_new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    logits = model(prompt, pos, attention_mask=None, inference_context=ctx, runtime_gather_output=True)[:, -1, :vocab_size].float()
    nxt = logits.argmax(-1)
    bad = [~torch.isfinite(logits).all()]  # on the device: read once, at the end
    _sync(device)
    ttft = time.perf_counter() - t0
    first = logits
    ctx.increment_sequence_len_offset(s)
    ctx.enable_decode_mode()
    out = [nxt]
    done = nxt == eos_id if eos_id is not None else torch.zeros_like(nxt, dtype=torch.bool)
    t1 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        offset = ctx.sequence_len_offset
        pos = torch.full((b, 1), offset, device=device, dtype=torch.long)
        logits = model(nxt.unsqueeze(1), pos, attention_mask=None, inference_context=ctx,
                       runtime_gather_output=True)[:, -1, :vocab_size]
        nxt = logits.float().argmax(-1)
        bad.append(~torch.isfinite(logits).all())
        ctx.increment_sequence_len_offset(1)
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
    _sync(device)
    decode_s = time.perf_counter() - t1
    flags = torch.stack(bad)
    step = int(flags.int().argmax()) + 1 if bool(flags.any()) else None
    return Generation(tokens=torch.stack(out, 1), ttft_s=ttft, decode_s=decode_s, first_logits=first, nonfinite_step=step)


@torch.no_grad()
def full_logits(model, tokens: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
    """float32 logits [batch, seq, vocab] of one forward over `tokens` (no KV cache)."""
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    return model(tokens, pos, attention_mask=None, runtime_gather_output=True)[..., :vocab_size].float()
