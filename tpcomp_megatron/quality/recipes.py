"""Recipes written by the evaluation tools (`tpcomp-calibrate --recipe`, `tpcomp-sensitivity
--allocate --recipe`): the Hugging Face model's fingerprint and where the recipe came from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..calibration import Calibration
from ..recipe import Recipe, model_fingerprint, save_recipe


def hf_fingerprint(model, name: str) -> dict:
    """`recipe.model_fingerprint` of a Hugging Face model, through the converter's own config
    mapping: the same fingerprint the converted Megatron checkpoint's config gives."""
    from ..models.core.hf_config import config_from_hf

    return model_fingerprint(config_from_hf(model.config.to_dict(), tensor_parallel_size=1), name=name)


def write_recipe(path: str | Path, *, model, model_id: str, tp: int, layers: Mapping[str, str], feedback: bool,
                 rule: str | None, calibration: Calibration | None) -> Path:
    """Write the recipe of a plan (layer -> codec spec) made by the running command."""
    from .records import environment

    env = environment()
    recipe = Recipe(model=hf_fingerprint(model, model_id), tp_size=tp, layers=dict(layers), error_feedback=feedback,
                    outlier_rule=rule, calibration=calibration,
                    made_by={"command": env["command"], "version": env["version"],
                             "commit": env["git"] or "none (not run from a checkout)"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(str(path), recipe)
    return path
