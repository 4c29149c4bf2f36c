"""Load a converted checkpoint into a Megatron GPTModel at the current tensor-parallel size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tpcomp_megatron.models.core.builder import LayerSpecTransform, build_gpt_model
from tpcomp_megatron.models.core.config import LlamaModelConfig, load_model_config

from .mapping import MappingError
from .writers import (
    CONFIG_NAME,
    DIGEST_NAME,
    FORMATS,
    LEGACY,
    TORCH_DIST,
    _load_into,
    config_digest,
    load_legacy_rank,
    load_torch_dist_into,
)


def load_config(checkpoint: str | os.PathLike[str]) -> LlamaModelConfig:
    """The model config stored with a converted checkpoint (a `LlamaModelConfig` or subclass)."""
    path = Path(checkpoint) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; is {checkpoint} a tpcomp-convert output folder?"
        )
    cfg = load_model_config(path)
    digest = Path(checkpoint) / DIGEST_NAME
    if digest.exists():  # (conversions before the digest have none)
        if digest.read_text().strip() != config_digest(cfg):
            raise MappingError(f"{path} does not match the config its tensors were written with ({digest}): it "
                               "was edited after conversion; restore it or convert the model again")
    return cfg


def available_formats(checkpoint: str | os.PathLike[str]) -> list[str]:
    return [f for f in FORMATS if (Path(checkpoint) / f).is_dir()]


def load_megatron_model(
    checkpoint: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    layer_spec_transform: LayerSpecTransform | None = None,
    **build_kwargs: Any,
) -> tuple[Any, LlamaModelConfig]:
    """Build the model at the current TP size and load its weights; returns (model, config).

    Call inside initialized Megatron parallel state (on CPU inside `cpu_megatron()`). `fmt` picks
    torch_dist (any TP size the padded shapes divide) or legacy (only the TP it was written for);
    default: torch_dist when present. `build_kwargs` go to `build_gpt_model`.
    """
    from megatron.core import parallel_state

    cfg = load_config(checkpoint)
    formats = available_formats(checkpoint)
    if fmt is None:
        if not formats:
            raise FileNotFoundError(f"{checkpoint} holds neither {TORCH_DIST}/ nor {LEGACY}/")
        fmt = formats[0]
    if fmt not in formats:
        raise FileNotFoundError(f"{checkpoint} has no {fmt}/ checkpoint; it has {formats}")
    build_kwargs.setdefault("perform_initialization", False)
    model = build_gpt_model(cfg, layer_spec_transform=layer_spec_transform, **build_kwargs)
    if fmt == TORCH_DIST:
        load_torch_dist_into(model, Path(checkpoint) / TORCH_DIST)
    else:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp != cfg.tensor_parallel_size:
            raise ValueError(
                f"the legacy checkpoint was written for TP={cfg.tensor_parallel_size}, this run has "
                f"TP={tp}; load the torch_dist checkpoint (reshardable) or convert again with --tp {tp}"
            )
        rank = parallel_state.get_tensor_model_parallel_rank()
        sd = load_legacy_rank(Path(checkpoint) / LEGACY, rank)
        _load_into(model, sd, f"loading {checkpoint}/{LEGACY} rank {rank}")
    return model, cfg
