"""The converted model's rope settings against what the installed transformers reads from the same
source (issue 32 item 3).

Rope settings live in two places in a config.json (`rope_theta` + `rope_scaling` in transformers
4.x, `rope_parameters` in 5.x), and transformers versions combine them differently; the converter
reads them itself. A reading that differs changes every position but the first, by an amount a
short logit check may not show; so `--verify` compares the fields themselves, before any logits,
and names the first that differs.
"""

from __future__ import annotations

import math
from typing import Any

from tpcomp_megatron.models.core.config import LlamaModelConfig
from tpcomp_megatron.models.core.rope import RopeScaling

_FULL, _SLIDING = "full_attention", "sliding_attention"
_FIELDS = ("rope_theta", "rope_type", "factor", "low_freq_factor", "high_freq_factor",
           "original_max_position_embeddings")
# Both sides come from the same JSON numbers; a GGUF stores the base as float32, which transformers
# and the converter both read through the same config, so only float rounding can differ.
_REL_TOL = 1e-6


class RopeMismatch(ValueError):
    """The checkpoint's rope settings differ from those transformers reads from the source."""


def _settings(theta: float | None, params: dict[str, Any]) -> dict[str, Any]:
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": params.get("rope_theta", theta), "rope_type": kind}
    if kind != "default":
        out["factor"] = params.get("factor")
    if kind == "llama3":
        out.update({k: params.get(k) for k in _FIELDS[3:]})
    return out


def transformers_rope(hf_config: Any) -> dict[str, dict[str, Any]]:
    """{attention kind or "": settings} as transformers reads them from `hf_config` (a
    `PretrainedConfig`): 5.x's `rope_parameters` (per layer type for Gemma 3), else 4.x's
    `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and (_FULL in params or _SLIDING in params):
        return {kind: _settings(None, p or {}) for kind, p in params.items() if kind in (_FULL, _SLIDING)}
    if isinstance(params, dict) and params:
        return {"": _settings(None, params)}
    theta = getattr(hf_config, "rope_theta", None)
    out = {"": _settings(theta, dict(getattr(hf_config, "rope_scaling", None) or {}))}
    local = getattr(hf_config, "rope_local_base_freq", None)
    if local is not None:
        out = {_FULL: out[""], _SLIDING: {"rope_theta": local, "rope_type": "default"}}
    return out


def checkpoint_rope(cfg: LlamaModelConfig) -> dict[str, dict[str, Any]]:
    """The same for a converted checkpoint's config (Gemma 3: the sliding layers' own rope)."""
    def settings(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
        if scaling is None:
            return {"rope_theta": theta, "rope_type": "default"}
        return _settings(theta, {"rope_type": scaling.rope_type, "factor": scaling.factor,
                                 "low_freq_factor": scaling.low_freq_factor,
                                 "high_freq_factor": scaling.high_freq_factor,
                                 "original_max_position_embeddings": scaling.original_max_position_embeddings})

    out = {"": settings(cfg.rope_theta, cfg.rope_scaling)}
    local = getattr(cfg, "local_rope_theta", None)
    if local is not None:
        out = {_FULL: out[""], _SLIDING: settings(local, getattr(cfg, "local_rope_scaling", None))}
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=_REL_TOL)
    return a == b


def _described(settings: dict[str, Any], field: str) -> str:
    if field == "rope_type" and settings["rope_type"] == "default":
        return "'default' (no scaling)"
    if field == "rope_type" and "factor" in settings:
        return f"{settings['rope_type']!r} (factor {settings['factor']})"
    value = settings.get(field)
    return "none" if value is None else repr(value)


def check_rope(cfg: LlamaModelConfig, hf_config: Any, source: str) -> None:
    """Raise RopeMismatch, one line naming the field, where the checkpoint's rope differs from
    what the installed transformers reads from `source` (its config is `hf_config`)."""
    import transformers

    ours, theirs = checkpoint_rope(cfg), transformers_rope(hf_config)
    kinds = sorted(set(ours) | set(theirs)) if len(ours) > 1 or len(theirs) > 1 else [""]
    for kind in kinds:
        # A model with one rope for every layer matches a per-layer-type one in each type.
        a, b = ours.get(kind, ours.get("")), theirs.get(kind, theirs.get(""))
        if a is None or b is None:
            continue
        for field in _FIELDS:
            if field in a or field in b:
                if not _same(a.get(field), b.get(field)):
                    where = f"{kind}.{field}" if kind else field
                    raise RopeMismatch(
                        f"rope '{where}' of the checkpoint is {_described(a, field)}, but transformers "
                        f"{transformers.__version__} reads {_described(b, field)} from {source}: the converted "
                        "model's positions differ from Hugging Face's; convert again with this version of "
                        "tpcomp-megatron, or report the config")
