"""`tpcomp-convert`: Hugging Face Llama-family, Gemma 1/2/3 and Qwen2/2.5/3 checkpoints <-> Megatron-core
TP layouts.

    tpcomp-convert SRC OUT --tp N [--formats torch_dist legacy] [--dtype bfloat16] [--verify]
    tpcomp-convert --reverse MEGATRON_CKPT HF_OUT            # back to a Hugging Face folder
    tpcomp-convert --verify MEGATRON_CKPT [--verify-tp M]     # check an existing conversion
    torchrun --nproc-per-node N -m tpcomp_megatron.convert --verify CKPT --device cuda

Exit status: 0 on success, 1 when verification exceeds its tolerance or the checkpoint's rope
settings differ from what transformers reads from the source, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from ..console import refuse
from ..quiet import VERBOSE_HELP, no_progress_bars
from .writers import FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpcomp-convert",
        description="Convert Hugging Face Llama-family, Gemma 1/2/3 and Qwen2/2.5/3 checkpoints (safetensors, "
        ".bin, GGUF) to Megatron-core tensor-parallel checkpoints (torch_dist and legacy), and back.",
    )
    p.add_argument(
        "source", help="HF folder or .gguf file (or a converted checkpoint with --reverse/--verify)"
    )
    p.add_argument("output", nargs="?", help="output folder (must not exist unless --force)")
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size to write for (default 1)"
    )
    p.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        help="checkpoint formats to write",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="stored dtype (default: the source's)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--reverse", action="store_true", help="convert a Megatron checkpoint back to a HF folder"
    )
    p.add_argument(
        "--format", dest="fmt", choices=FORMATS, help="which format to read (--reverse/--verify)"
    )
    p.add_argument(
        "--verify", action="store_true", help="compare logits with HF transformers after converting"
    )
    p.add_argument("--verify-tp", type=int, help="TP size for --verify (default: the checkpoint's)")
    p.add_argument(
        "--hf-source", help="HF folder or GGUF to verify against (default: the converted source)"
    )
    p.add_argument("--max-abs", type=float, help="largest allowed absolute logit difference")
    p.add_argument("--min-cosine", type=float, help="smallest allowed per-token logit cosine")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="verify on CPU gloo ranks or GPU (torchrun)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def _verify(args: argparse.Namespace, checkpoint: str) -> int:
    with no_progress_bars(args.no_progress):  # transformers' "Loading weights" bars too
        return _verify_report(args, checkpoint)


def _verify_report(args: argparse.Namespace, checkpoint: str) -> int:
    from . import verify as v

    limits = dict(
        max_abs=v.DEFAULT_MAX_ABS if args.max_abs is None else args.max_abs,
        min_cosine=v.DEFAULT_MIN_COSINE if args.min_cosine is None else args.min_cosine,
    )
    from .rope_check import RopeMismatch

    try:
        if args.device == "cuda":
            report = v.verify_torchrun(checkpoint, fmt=args.fmt, source=args.hf_source, **limits)
            if report is None:  # not rank 0
                return 0
        else:
            report = v.verify_checkpoint(
                checkpoint, tp=args.verify_tp, fmt=args.fmt, source=args.hf_source, **limits
            )
    except RopeMismatch as e:  # the checkpoint differs from HF: a failed verification, found before any logits
        rank = f" (rank {os.environ.get('RANK', '0')})" if args.device == "cuda" else ""  # every rank says it
        print(f"verify{rank}: {e} -> FAILED", flush=True)
        return 1
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import convert_hf_to_megatron, convert_megatron_to_hf

    try:
        if args.output is None:
            if not args.verify:
                raise ValueError(
                    "give an OUTPUT folder (or --verify to check an existing checkpoint)"
                )
            return _verify(args, args.source)
        if args.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {args.tp}")
        if args.reverse:
            cfg = convert_megatron_to_hf(args.source, args.output, fmt=args.fmt, force=args.force)
            print(f"wrote {args.output}: {cfg.hf_architecture}, {cfg.num_layers} layers")
            return 0
        with no_progress_bars(args.no_progress):  # a GGUF source is read through transformers
            cfg = convert_hf_to_megatron(
                args.source,
                args.output,
                tp=args.tp,
                formats=args.formats,
                dtype=args.dtype,
                force=args.force,
                progress=not args.no_progress,
            )
        layout = cfg.head_layout
        print(
            f"wrote {args.output} for TP={cfg.tensor_parallel_size} ({', '.join(args.formats)}): "
            f"{cfg.num_layers} layers, heads {layout.num_heads}/{layout.num_kv_heads} -> "
            f"{layout.padded_num_heads}/{layout.padded_num_kv_heads}, vocab {cfg.vocab_size} -> "
            f"{cfg.padded_vocab_size}, {cfg.params_dtype}"
        )
        if args.verify:
            return _verify(args, args.output)
        return 0
    except (ValueError, OSError) as e:  # bad input, or the filesystem (exists, missing, read-only, full)
        return refuse("tpcomp-convert", e)  # on every rank under torchrun (--verify --device cuda)
