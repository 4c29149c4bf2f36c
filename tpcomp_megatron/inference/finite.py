"""Non-finite logits: say where they start, never print them as a result.

Under compression a layer's output can turn NaN or inf (a scale that overflows, a broken
calibration, a bad weight); the logits are then NaN, greedy decoding picks whatever argmax makes
of NaN and the text looks like a result, and a quality record says `ppl nan`. The check is one
reduction on the logits; only when it fails is the forward run again with a hook on every module,
to name the first whose output holds NaN or inf (in the order forwards end: a layer's parts before
the layer, so the innermost origin comes first).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch


class NonFiniteLogits(RuntimeError):
    """Logits held NaN or inf; the message names the first module whose output did."""


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _tensors(x):
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):  # Hugging Face's ModelOutput too
        for y in x.values():
            yield from _tensors(y)


def first_nonfinite_module(model: torch.nn.Module, forward: Callable[[], object], *, group=None) -> str | None:
    """Run `forward()` (a forward of `model`) with a hook on every module; the name of the first
    module whose output held NaN or inf, or None. With a process group of several ranks, every
    rank runs it and all name the same module (the earliest over the ranks: a shard's NaN shows
    on its own rank first)."""
    order: list[str] = []
    bad: list[int] = []

    def hook(name):
        def check(mod, args, output):
            if not bad and not all(is_finite(t) for t in _tensors(output)):
                bad.append(len(order))
            order.append(name)
        return check

    handles = [m.register_forward_hook(hook(n or "the model's output")) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    first = bad[0] if bad else len(order)
    if group is not None:
        import torch.distributed as dist

        if dist.get_world_size(group) > 1:
            device = next(model.parameters()).device
            t = torch.tensor([first], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
            first = int(t)
    return order[first] if first < len(order) else None


def describe(name: str | None) -> str:
    if name is None:
        return "no module's output was non-finite in a second forward over the same tokens (not reproducible)"
    layer = re.search(r"layers\.(\d+)\.", name + ".")
    where = f"{name} (transformer layer {layer.group(1)}, counting from 0)" if layer else name
    return f"first non-finite output: {where}"


def nonfinite_error(what: str, model: torch.nn.Module, forward: Callable[[], object], *, group=None) -> NonFiniteLogits:
    """The error for non-finite logits of `what`, naming the first module (`forward` reproduces them)."""
    name = first_nonfinite_module(model, forward, group=group)
    return NonFiniteLogits(f"{what}: the logits are non-finite (NaN or inf), not a result; {describe(name)}")


def check_logits(logits: torch.Tensor, model: torch.nn.Module, forward: Callable[[], object], *, what: str,
                 group=None) -> None:
    """Raise `NonFiniteLogits` if `logits` hold NaN or inf (`forward` reproduces them)."""
    if not is_finite(logits):
        raise nonfinite_error(what, model, forward, group=group)


def check_generation(model: torch.nn.Module, prompt: torch.Tensor, gen, *, vocab_size: int, what: str,
                     group=None) -> None:
    """Raise `NonFiniteLogits` if a step of `gen` (loop.greedy_generate) had non-finite logits,
    found again by generating up to that step once more (the same forwards, KV cache and message
    sizes: a path that breaks on decode steps alone shows again)."""
    if gen.nonfinite_step is None:
        return
    from .loop import greedy_generate

    raise nonfinite_error(f"{what}, from generated token {gen.nonfinite_step}", model,
                          lambda: greedy_generate(model, prompt, gen.nonfinite_step, vocab_size=vocab_size),
                          group=group)
