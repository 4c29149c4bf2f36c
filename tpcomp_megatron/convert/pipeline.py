"""The two conversions end to end: HF -> Megatron (any TP, both formats) and Megatron -> HF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from tpcomp_megatron.models.core.config import LlamaModelConfig
from tpcomp_megatron.models.core.hf_config import config_from_hf

from .hf_io import HFSource, open_hf_source, write_hf_folder
from .load import available_formats, load_config
from .mapping import check_hf_tensors, hf_to_megatron, megatron_to_hf
from .writers import (
    CONFIG_NAME,
    DIGEST_NAME,
    FORMATS,
    LEGACY,
    TORCH_DIST,
    atomic_output,
    check_output_vs_source,
    config_digest,
    read_legacy,
    read_torch_dist,
    write_legacy,
    write_torch_dist,
)


def _progress(total: int, desc: str, enabled: bool):  # noqa: ANN202 - tqdm's type is private
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def convert_hf_to_megatron(
    source: str | os.PathLike[str] | HFSource,
    output: str | os.PathLike[str],
    *,
    tp: int,
    formats: Sequence[str] = FORMATS,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    make_vocab_size_divisible_by: int = 128,
) -> LlamaModelConfig:
    """Convert a HF folder or GGUF file (or an opened `HFSource`) to Megatron-core checkpoints for
    TP=`tp` in `output`.

    `formats`: any of "torch_dist", "legacy". `dtype`: float32/bfloat16/float16, None keeps the
    source's. The output appears only when everything was written (see `atomic_output`).
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    out = Path(output)
    check_output_vs_source(out, source.path if isinstance(source, HFSource) else source)
    if out.exists() and not force:
        # Checked before reading the source: a large model should not load only to fail here.
        raise FileExistsError(f"output {out} already exists; choose another path or pass --force")
    src = source if isinstance(source, HFSource) else open_hf_source(source)
    try:
        cfg = config_from_hf(
            src.config,
            tensor_parallel_size=tp,
            params_dtype=dtype or src.dtype,
            tokenizer=src.tokenizer,
            source=src.path,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        )
        check_hf_tensors(cfg, src.shapes)
    except ValueError as e:  # name the source: the config's field alone does not say which model
        if str(src.path) in str(e):
            raise
        raise type(e)(f"{src.path}: {e}") from None
    steps = cfg.num_layers + len(formats) + 1
    with (
        atomic_output(out, force=force) as tmp,
        _progress(steps, "tpcomp-convert", progress) as bar,
    ):
        global_sd = hf_to_megatron(cfg, src.get, on_layer=lambda i: bar.update(1))
        cfg.save(tmp / CONFIG_NAME)
        (tmp / DIGEST_NAME).write_text(config_digest(cfg) + "\n")
        bar.update(1)
        if LEGACY in formats:
            bar.set_postfix_str(LEGACY)
            write_legacy(tmp / LEGACY, cfg, global_sd)
            bar.update(1)
        if TORCH_DIST in formats:
            bar.set_postfix_str(TORCH_DIST)
            write_torch_dist(tmp / TORCH_DIST, cfg, global_sd)
            bar.update(1)
    return cfg


def read_megatron_global(
    checkpoint: str | os.PathLike[str], fmt: str | None = None
) -> tuple[LlamaModelConfig, dict[str, torch.Tensor]]:
    """The config and global (TP=1 layout) tensors of a converted checkpoint."""
    ckpt = Path(checkpoint)
    cfg = load_config(ckpt)
    formats = available_formats(ckpt)
    fmt = fmt or (LEGACY if LEGACY in formats else TORCH_DIST)
    if fmt not in formats:
        raise FileNotFoundError(f"{ckpt} has no {fmt}/ checkpoint; it has {formats}")
    if fmt == LEGACY:
        return cfg, read_legacy(ckpt / LEGACY, cfg)
    return cfg, read_torch_dist(ckpt / TORCH_DIST, cfg)


def convert_megatron_to_hf(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    force: bool = False,
) -> LlamaModelConfig:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files if known).

    The tensors are the exact originals (padding removed); config.json is the source's as stored.
    """
    out = Path(output)
    check_output_vs_source(out, checkpoint)
    if out.exists() and not force:
        raise FileExistsError(f"output {out} already exists; choose another path or pass --force")
    cfg, global_sd = read_megatron_global(checkpoint, fmt)
    tensors = megatron_to_hf(cfg, global_sd)
    hf_config = dict(cfg.hf_config or {})
    if not hf_config:
        raise ValueError(
            f"{checkpoint}/{CONFIG_NAME} has no hf_config; it cannot be turned back into HF"
        )
    tok = cfg.tokenizer.path if cfg.tokenizer and not cfg.tokenizer.gguf_file else None
    with atomic_output(out, force=force) as tmp:
        write_hf_folder(tmp, hf_config, tensors, tokenizer_from=tok)
    return cfg
