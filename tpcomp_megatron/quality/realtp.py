"""Real ranks: the converted Megatron model on N gloo processes, through `apply_tp_compression`.

This is the deployed path (CompressedRowParallelLinear -> CompressedComm on the reference codecs,
gate forced open with `min_bytes=0`), used to check the simulation (partial sums, perplexity) and to
calibrate on real ranks. The functions named `rank_*` run inside `run_ranks`, one call per rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..console import say
from .metrics import Totals, add_compared, add_reference
from .records import slug
from .text import TokenWindows, cache_dir

ROW_SUFFIXES = ("self_attention.linear_proj", "mlp.linear_fc2")


def convert_checkpoint(hf_folder: str | Path, tp: int, *, model_id: str, out: str | Path | None = None) -> Path:
    """A legacy Megatron checkpoint of a Hugging Face folder for TP=`tp`, converted once (cached)."""
    from ..convert import CONFIG_NAME, convert_hf_to_megatron

    out = Path(out) if out is not None else cache_dir() / "megatron" / f"{slug(model_id)}-tp{tp}"
    if not (out / CONFIG_NAME).exists():
        out.parent.mkdir(parents=True, exist_ok=True)  # the cache folder, on a fresh machine
        try:
            convert_hf_to_megatron(hf_folder, out, tp=tp, formats=["legacy"], progress=False, force=out.exists())
        except ValueError as e:
            raise ValueError(f"the Megatron converter cannot convert {model_id} yet: {e}") from e
    return out


@contextlib.contextmanager
def _megatron(ckpt: str, world: int):
    """The converted model at TP=`world` on CPU; parallel state is torn down on exit, so one
    rank process can run several of these one after the other."""
    from megatron.core import parallel_state, tensor_parallel

    from ..convert import load_megatron_model
    from ..megatron.cpu import cpu_megatron

    with cpu_megatron():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        try:
            tensor_parallel.model_parallel_cuda_manual_seed(1)
            model, cfg = load_megatron_model(ckpt, fmt="legacy", parallel_output=False)
            yield model.eval(), cfg
        finally:
            parallel_state.destroy_model_parallel()


def _row_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(ROW_SUFFIXES)}


def _forward(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    from ..inference.loop import full_logits

    return full_logits(model, tokens, vocab_size=vocab)


def rank_partial_sums(rank: int, world: int, ckpt: str, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's partial sum of every row-parallel layer, `[batch, seq, hidden]` float32."""
    out: dict[str, torch.Tensor] = {}
    with _megatron(ckpt, world) as (model, cfg):
        # The layer's own input and weight: exactly what its local matmul multiplies. Megatron
        # runs [seq, batch, in]; transposed to Hugging Face's [batch, seq, hidden].
        hooks = [m.register_forward_pre_hook(
            lambda mod, args, name=name: out.__setitem__(name, F.linear(args[0], mod.weight).transpose(0, 1).float().clone()))
            for name, m in _row_layers(model).items()]
        _forward(model, tokens, cfg.vocab_size)
        for h in hooks:
            h.remove()
    return out


def rank_statistics(rank: int, world: int, ckpt: str, windows: TokenWindows,
                    directions: int | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per layer: (min, max) of this rank's partial sums and (min, max) of the reduced output,
    per channel, over every window, then the direction sketches `[1, <= directions, hidden]` of
    both (default `SKETCH_ROWS`)."""
    from ..calibration import SKETCH_ROWS, sketch_rows

    keep = directions or SKETCH_ROWS

    stats: dict[str, list[torch.Tensor]] = {}
    sketches: dict[str, list[torch.Tensor | None]] = {}

    def sketch(name: str, i: int, rows: torch.Tensor) -> None:
        s = sketches.setdefault(name, [None, None])
        s[i] = sketch_rows(s[i], rows.unsqueeze(0), keep)

    def merge(name: str, i: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        s = stats.setdefault(name, [None] * 4)
        s[i] = lo if s[i] is None else torch.minimum(s[i], lo)
        s[i + 1] = hi if s[i + 1] is None else torch.maximum(s[i + 1], hi)

    def pre(mod, args, name):
        p = F.linear(args[0], mod.weight).float().reshape(-1, mod.weight.shape[0])
        merge(name, 0, p.amin(0), p.amax(0))
        sketch(name, 0, p)

    def post(mod, args, output, name):
        y = output[0].float().reshape(-1, output[0].shape[-1])
        merge(name, 2, y.amin(0), y.amax(0))
        sketch(name, 1, y)

    with _megatron(ckpt, world) as (model, cfg):
        hooks = []
        for name, m in _row_layers(model).items():
            hooks.append(m.register_forward_pre_hook(lambda mod, a, name=name: pre(mod, a, name)))
            hooks.append(m.register_forward_hook(lambda mod, a, o, name=name: post(mod, a, o, name)))
        for i in range(windows.inputs.shape[0]):
            _forward(model, windows.inputs[i:i + 1], cfg.vocab_size)
        for h in hooks:
            h.remove()
    return {n: (*s, *sketches[n]) for n, s in stats.items()}


@dataclass(frozen=True)
class RealPoint:
    """A codec to run on real ranks; outlier codecs name their calibration file and rule.
    `overrides`: (module-name pattern, spec) pairs, as `--tp-comm-compression-override` (a mixed
    plan: its promoted layers by name); `feedback`: error feedback (`--tp-comm-error-feedback`)."""

    spec: str
    calibration: str | None = None
    ratio: int | None = None
    rule: str | None = None
    algorithm: str = "one_shot"
    overrides: tuple[tuple[str, str], ...] = ()
    feedback: bool = False


def evaluate_on_ranks(folder: str | Path, model_id: str, tp: int, windows: TokenWindows, points: Sequence[RealPoint],
                      *, log=say) -> tuple:
    """`rank_evaluate` of `points` on `tp` gloo ranks, on the model's converted checkpoint (made
    once, cached): (baseline Totals, [Totals], [seconds], [fallback calls]) per point."""
    from ..testing import run_ranks

    ckpt = convert_checkpoint(folder, tp, model_id=model_id)
    log(f"real ranks: TP={tp}, {len(points)} points, {windows.inputs.shape[0]} windows ({ckpt})")
    return run_ranks(rank_evaluate, tp, str(ckpt), windows, points, timeout_s=6 * 3600, pg_timeout_s=1800)[0]


def rank_evaluate(rank: int, world: int, ckpt: str, windows: TokenWindows, points: Sequence[RealPoint]):
    """(baseline Totals, [Totals per point], [seconds per point], [fallback calls per point]) on
    rank 0 (every rank computes the same gathered logits; only rank 0 scores them)."""
    from megatron.core import parallel_state

    from ..calibration import load_calibration
    from ..inference.finite import describe, first_nonfinite_module, is_finite, nonfinite_error
    from ..megatron import CompressionConfig, apply_tp_compression

    base, totals = Totals(), [Totals() for _ in points]
    seconds, fallbacks = [0.0] * len(points), [0] * len(points)
    with _megatron(ckpt, world) as (model, cfg):
        configs = []
        for p in points:
            cal = None
            if p.calibration:
                cal = load_calibration(p.calibration).reselect(ratio=p.ratio, rule=p.rule)
            configs.append((CompressionConfig(spec=p.spec, calibration=p.calibration, min_bytes=0, link="cpu",
                                              algorithm=p.algorithm, overrides=p.overrides,
                                              error_feedback=p.feedback), cal))
        group = parallel_state.get_tensor_model_parallel_group()
        for i in range(windows.inputs.shape[0]):
            x, targets = windows.inputs[i:i + 1], windows.targets(i)
            ref = windows.scored_logits(_forward(model, x, cfg.vocab_size)[0])
            if not is_finite(ref):  # (the gathered logits: every rank decides alike)
                raise nonfinite_error(f"window {i + 1}, uncompressed", model, lambda: _forward(model, x, cfg.vocab_size),
                                      group=group)
            add_reference(base, ref, targets)
            for j, (config, cal) in enumerate(configs):
                t0 = time.perf_counter()
                handle = apply_tp_compression(model, config, calibration=cal)
                try:
                    logits = windows.scored_logits(_forward(model, x, cfg.vocab_size)[0])
                    fallbacks[j] += handle.stats.calls_fallback
                    if totals[j].nonfinite is None and not is_finite(logits):  # marks the point's record
                        where = first_nonfinite_module(model, lambda: _forward(model, x, cfg.vocab_size), group=group)
                        totals[j].nonfinite = f"window {i + 1}: {describe(where)}"
                finally:
                    handle.remove()
                add_compared(totals[j], logits, ref, targets)
                seconds[j] += time.perf_counter() - t0
    return (base, totals, seconds, fallbacks) if rank == 0 else None
