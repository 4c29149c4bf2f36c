"""`generate.py --compare`: compressed against exact, saying which number comes from what.

Two measurements that answer different questions, and can look contradictory side by side:
* greedy decoding, each model feeding itself its own tokens: the texts part at the first step where
  the compressed model's argmax differs, often a near-tie of the exact model's top two tokens,
  after which the continuations share nothing. So where they part, the exact model's top-2 margin
  at that step, against its median margin over the continuation: a small margin is a near-tie, a
  typical one is a real change.
* a teacher-forced prefill: both models read the same tokens (the prompt and the exact
  continuation) in one forward, and are compared position by position (top-1 agreement, KL),
  free of the compounding of greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compare_lines(exact: torch.Tensor, compressed: torch.Tensor, exact_logits: torch.Tensor,
                  compressed_logits: torch.Tensor, prompt_len: int, decode: Callable[[list[int]], str]) -> list[str]:
    """The comparison's lines. `exact` / `compressed`: `[new]` greedy tokens; `*_logits`:
    `[prompt + new, vocab]` of the teacher-forced prefill over the prompt and `exact`."""
    n = min(len(exact), len(compressed))
    same = int((exact[:n] == compressed[:n]).long().cumprod(0).sum())
    p = torch.log_softmax(exact_logits[prompt_len - 1:prompt_len - 1 + len(exact)].double(), -1)
    q = torch.log_softmax(compressed_logits[prompt_len - 1:prompt_len - 1 + len(exact)].double(), -1)
    top2 = p.topk(2, -1).values
    margins = top2[:, 0] - top2[:, 1]  # log-probabilities: the logit difference of the top two tokens
    if same == n:
        greedy = f"all {n} tokens identical"
    else:
        a, b = int(exact[same]), int(compressed[same])
        greedy = (f"first {same} of {n} tokens identical; at token {same + 1} exact chose {decode([a])!r} "
                  f"(p {p[same, a].exp():.2f}), compressed {decode([b])!r} (exact's p {p[same, b].exp():.2f}): "
                  f"the exact model's top-2 margin there is {margins[same]:.2f} nats, its median over the "
                  f"{len(exact)} steps {margins.median():.2f}")
    kl = (p.exp() * (p - q)).sum(-1)
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean()
    return ["compressed vs exact:",
            f"  greedy decoding (each model continues its own text): {greedy}",
            f"  teacher-forced prefill (both read the prompt + exact continuation, {len(exact)} positions scored): "
            f"top-1 agreement {top1:.1%}, KL(exact||compressed) mean {kl.mean():.2e}, max {kl.max():.2e}"]
