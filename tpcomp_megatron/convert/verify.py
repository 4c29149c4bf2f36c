"""Check a converted checkpoint by its logits against Hugging Face transformers (fp32, eager).

The Megatron side loads the checkpoint at TP=N: on CPU in N spawned gloo ranks, on GPU in the ranks
`torchrun` started (NCCL). Both sides run in fp32, so what remains is summation-order noise; the
comparison is on logits (max-abs and cosine per position), never argmax alone. The rope settings
are compared first, field by field (`rope_check`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .load import load_config, load_megatron_model
from .rope_check import check_rope

DEFAULT_TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in "
    "my purse, and nothing particular to interest me on shore, I thought I would sail about a little."
)
# fp32 on both sides: differences come from reduction order (blocked matmuls, the TP all-reduce),
# ~1e-6 relative per op, growing with depth; logits of O(10) give ~1e-4 after 30 layers.
DEFAULT_MAX_ABS = 1e-2
DEFAULT_MIN_COSINE = 0.99999


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Logit agreement between the converted checkpoint and Hugging Face."""

    tp: int
    tokens: int
    max_abs: float
    min_cosine: float
    mean_cosine: float
    argmax_agreement: float
    ok: bool

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"verify TP={self.tp}, {self.tokens} tokens: max-abs {self.max_abs:.3g}, cosine min "
            f"{self.min_cosine:.7f} mean {self.mean_cosine:.7f}, argmax agreement "
            f"{self.argmax_agreement:.3f} -> {verdict}"
        )


def _hf_model(source: str) -> Any:
    from transformers import AutoModelForCausalLM

    p = Path(source)
    kwargs: dict[str, Any] = dict(dtype=torch.float32, attn_implementation="eager")
    if p.is_file():
        from .gguf_source import load_gguf_model

        return load_gguf_model(p)
    return AutoModelForCausalLM.from_pretrained(str(p), **kwargs).eval()


def _hf_config(source: str) -> Any:
    """The transformers config of a HF folder or GGUF, as the installed transformers reads it."""
    from transformers import AutoConfig

    p = Path(source)
    if p.is_file():
        return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    return AutoConfig.from_pretrained(str(p))


def make_tokens(
    checkpoint: str | os.PathLike[str], text: str = DEFAULT_TEXT, max_len: int = 64
) -> torch.Tensor:
    """`[1, s]` token ids: `text` through the checkpoint's tokenizer, else seeded random ids."""
    cfg = load_config(checkpoint)
    tok = cfg.tokenizer
    if tok is not None and Path(tok.path).exists():
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": tok.gguf_file} if tok.gguf_file else {}
        ids = AutoTokenizer.from_pretrained(tok.path, **kwargs)(text, return_tensors="pt")[
            "input_ids"
        ]
        return ids[:, :max_len]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (1, min(max_len, 32)), generator=gen)


def megatron_logits(
    checkpoint: str, tokens: torch.Tensor, fmt: str | None, device: str = "cpu", **build_kwargs: Any
) -> torch.Tensor:
    """Full-vocab fp32 logits `[b, s, padded_vocab]` on this rank (parallel state must be set up)."""
    from tpcomp_megatron.models.core.builder import causal_attention_mask

    model, _ = load_megatron_model(
        checkpoint, fmt=fmt, parallel_output=False, params_dtype=torch.float32, **build_kwargs
    )
    model = model.to(device).eval()
    ids = tokens.to(device)
    pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, causal_attention_mask(ids.shape[1], device)).float().cpu()


def _cpu_rank(
    rank: int, world_size: int, checkpoint: str, tokens: torch.Tensor, fmt: str | None
) -> Any:
    from megatron.core import parallel_state, tensor_parallel

    from tpcomp_megatron.megatron.cpu import cpu_megatron

    with cpu_megatron(allow_with_cuda=True):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        try:
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            logits = megatron_logits(checkpoint, tokens, fmt)
        except ValueError as e:  # a refused checkpoint: one line for the parent, not a traceback per rank
            return _REFUSED, str(e)
        finally:
            parallel_state.destroy_model_parallel()
    return logits if rank == 0 else None


_REFUSED = "refused"


def compare_logits(
    ref: torch.Tensor, got: torch.Tensor, *, tp: int, max_abs: float, min_cosine: float
) -> VerifyReport:
    """Compare `[b, s, V]` logits (got may carry padded vocab columns, which are dropped)."""
    got = got[..., : ref.shape[-1]].float()
    ref = ref.float()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, -2), got.flatten(0, -2), dim=-1)
    diff = float((ref - got).abs().max())
    agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    ok = diff <= max_abs and float(cos.min()) >= min_cosine
    return VerifyReport(tp, ref.shape[-2], diff, float(cos.min()), float(cos.mean()), agree, ok)


def hf_logits(source: str | Any, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the HF model at `source` (folder or GGUF), or of a loaded transformers model."""
    model = _hf_model(source) if isinstance(source, (str, os.PathLike)) else source
    with torch.no_grad():
        return model(tokens).logits.float()


def verify_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    tp: int | None = None,
    fmt: str | None = None,
    source: str | None = None,
    hf_model: Any = None,
    tokens: torch.Tensor | None = None,
    max_abs: float = DEFAULT_MAX_ABS,
    min_cosine: float = DEFAULT_MIN_COSINE,
    timeout_s: float = 1800.0,
) -> VerifyReport:
    """Run the checkpoint at TP=`tp` (default: its own) on CPU gloo ranks and compare with HF.

    `source` overrides the HF model recorded in the config; `hf_model` (a loaded transformers
    model, fp32 eager) skips loading it again. For GPU/NCCL, launch
    `torchrun --nproc-per-node N -m tpcomp_megatron.convert --verify CKPT --device cuda`.
    """
    from tpcomp_megatron.testing import run_ranks

    ckpt = str(Path(checkpoint).absolute())
    cfg = load_config(ckpt)
    tp = tp or cfg.tensor_parallel_size
    if tp < 1:
        raise ValueError(f"--verify-tp must be >= 1, got {tp}")
    cfg.head_layout.check_divides(tp)  # here, not as a traceback from inside the spawned ranks
    src = source or cfg.source
    if hf_model is None and (not src or not Path(src).exists()):
        raise FileNotFoundError(f"the HF source {src!r} is not available; pass --hf-source")
    # Before any logits (and before a GGUF's model is loaded, which would stay in memory beside the
    # ranks'): a rope read differently is named by its field, whatever the logits show.
    check_rope(cfg, hf_model.config if hf_model is not None else _hf_config(str(src)), str(src))
    ids = tokens if tokens is not None else make_tokens(ckpt)
    outs = run_ranks(_cpu_rank, tp, ckpt, ids, fmt, timeout_s=timeout_s, pg_timeout_s=timeout_s)
    refused = [o[1] for o in outs if isinstance(o, tuple) and o[0] == _REFUSED]
    if refused:
        raise ValueError(refused[0])
    got = outs[0]
    ref = hf_logits(hf_model if hf_model is not None else str(src), ids)
    return compare_logits(ref, got, tp=tp, max_abs=max_abs, min_cosine=min_cosine)


def verify_torchrun(
    checkpoint: str,
    *,
    fmt: str | None = None,
    source: str | None = None,
    max_abs: float = DEFAULT_MAX_ABS,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> VerifyReport | None:
    """The GPU path: call in every rank of a `torchrun` launch; rank 0 returns the report."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("verify on cuda must be launched by torchrun (LOCAL_RANK is not set)")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        cfg = load_config(checkpoint)
        src = source or str(cfg.source)
        check_rope(cfg, _hf_config(src), src)  # on every rank, before the model is built
        ids = make_tokens(checkpoint)
        got = megatron_logits(checkpoint, ids, fmt, device=f"cuda:{local}")
        parallel_state.destroy_model_parallel()
        if dist.get_rank() != 0:
            return None
        ref = hf_logits(src, ids)
        return compare_logits(
            ref, got, tp=dist.get_world_size(), max_abs=max_abs, min_cosine=min_cosine
        )
    finally:
        dist.destroy_process_group()
