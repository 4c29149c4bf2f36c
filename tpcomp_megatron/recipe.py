"""A recipe: everything a compressed deployment needs, in one file, applied as one unit.

`tpcomp-calibrate --recipe` and `tpcomp-sensitivity --allocate --recipe` write one; the runtime
takes it with `--tp-comm-recipe PATH` or `CompressionConfig(recipe=PATH)`.

File format (`*.safetensors`; loading runs no code from the file: safetensors tensors and JSON):
* tensors: the calibration data each layer's codec needs, named as in calibration files:
  `L.min`, `L.max`, `L.channels` (outlier codecs), `L.basis` (low-rank codecs: only the K
  directions the codec uses);
* metadata key `tpcomp_recipe`, a JSON object:
    {"format": "tpcomp-recipe", "version": 1,
     "model": {"name", "architecture", "hidden", "layers", "vocab", "config_hash"},
     "tp_size": int, "error_feedback": bool, "outlier_rule": str | null,
     "layers": {layer name: codec spec or "none"},
     "calibration": null | {"text", "tokens", "source", "ratio", "rule"},
     "made_by": {"command": str, "commit": str}}
Writing is deterministic (sorted keys, no dates): the same inputs give the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import RULES, Calibration
from .codecs import LowRankSpec, OutlierSpec, needs_calibration, parse_codec_spec

FORMAT = "tpcomp-recipe"
FORMAT_KEY = "tpcomp_recipe"
VERSION = 1
# Config fields that do not change the function the model computes at a TP size: padding and
# layout chosen for a TP size, storage dtype, where files live.
_NOT_FINGERPRINTED = ("tensor_parallel_size", "padded_vocab_size", "padded_ffn_hidden_size", "kv_replication",
                      "dummy_kv_groups", "params_dtype", "tokenizer", "source", "hf_config",
                      "make_vocab_size_divisible_by")


def model_fingerprint(model_config, name: str | None = None) -> dict[str, Any]:
    """The fingerprint of a model config (`models.config.LlamaModelConfig` or a subclass; from a
    Hugging Face config: `models.hf_config.config_from_hf`): architecture, hidden, layers, vocab
    and a hash of every field that shapes the computed function."""
    fields = _float32_digits({k: v for k, v in model_config.to_dict().items() if k not in _NOT_FINGERPRINTED})
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"name": name, "architecture": model_config.hf_architecture, "hidden": model_config.hidden_size,
            "layers": model_config.num_layers, "vocab": model_config.vocab_size, "config_hash": digest}


def _float32_digits(value: Any) -> Any:
    """Floats to 6 significant digits: a GGUF stores 1e-5 as float32 (9.9999997e-06), a
    config.json as 1e-05; both are the same model."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _float32_digits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_float32_digits(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A loaded (or to-be-written) recipe."""

    model: dict[str, Any]
    """`model_fingerprint` of the model it was made for."""
    tp_size: int
    layers: dict[str, str]
    """Row-parallel layer name -> codec spec ('none': exact)."""
    error_feedback: bool = False
    outlier_rule: str | None = None
    calibration: Calibration | None = None
    """The calibration data the layers' codecs need (None when no codec needs any)."""
    made_by: dict[str, str] = dataclasses.field(default_factory=dict)
    """{'command', 'commit'} that made it."""

    def __post_init__(self) -> None:
        if not isinstance(self.tp_size, int) or self.tp_size < 2:
            raise ValueError(f"recipe TP size must be an integer >= 2, got {self.tp_size!r}")
        if not self.layers:
            raise ValueError("a recipe names at least one layer")
        specs = {name: parse_codec_spec(spec) for name, spec in self.layers.items()}  # raises on a bad spec
        if any(needs_calibration(s) for s in specs.values()) and self.calibration is None:
            raise ValueError("the recipe's codecs need calibration data, and none was given")
        object.__setattr__(self, "layers", {n: str(s or "none") for n, s in sorted(specs.items())})

    def check(self, *, tp_size: int, layer_names: list[str], hidden: int, num_layers: int,
              fingerprint: dict[str, Any] | None = None, model_name: str | None = None, where: str = "recipe") -> None:
        """Refuse a recipe made for another model, TP size or layer set, naming each mismatch."""
        m, problems = self.model, []
        if self.tp_size != tp_size:
            problems.append(f"it was made for TP={self.tp_size}, the model runs at TP={tp_size}")
        for key, got in (("hidden", hidden), ("layers", num_layers)):
            if m.get(key) != got:
                problems.append(f"it was made for a model with {key}={m.get(key)}, this one has {key}={got}")
        if fingerprint is not None:
            for key in ("architecture", "vocab", "config_hash"):
                if m.get(key) != fingerprint.get(key):
                    problems.append(f"its model {key} is {m.get(key)!r}, this model's is {fingerprint.get(key)!r}")
        if model_name is not None and m.get("name") and m["name"] != model_name:
            problems.append(f"it was made for model {m['name']!r}, not {model_name!r}")
        missing = sorted(set(layer_names) - set(self.layers))
        unknown = sorted(set(self.layers) - set(layer_names))
        if missing:
            problems.append(f"it has no codec for layer(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unknown:
            problems.append(f"it names layer(s) {unknown[:3]} this model does not have")
        if problems:
            raise ValueError(f"{where} does not match this model: " + "; ".join(problems)
                             + ". Make a recipe for this model and TP size (tpcomp-calibrate --recipe, "
                             "tpcomp-sensitivity --allocate --recipe).")


def _needed_tensors(name: str, spec, cal: Calibration, rule: str | None) -> dict[str, torch.Tensor]:
    if isinstance(spec, OutlierSpec):
        chosen = cal.reselect(ratio=spec.ratio, rule=rule)
        lo, hi = cal.stats[name]
        return {f"{name}.min": lo, f"{name}.max": hi, f"{name}.channels": chosen.channels[name]}
    if isinstance(spec, LowRankSpec):
        return {f"{name}.basis": cal.basis(name, spec.rank)}
    return {}


def save_recipe(path: str, recipe: Recipe) -> None:
    """Write `recipe` (only the calibration tensors its codecs use), atomically and deterministically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    cal = recipe.calibration
    for name, spec in recipe.layers.items():
        parsed = parse_codec_spec(spec)
        if needs_calibration(parsed):
            tensors.update(_needed_tensors(name, parsed, cal, recipe.outlier_rule))
    cal_meta = None
    if tensors:
        cal_meta = {k: cal.meta.get(k) for k in ("text", "tokens", "source", "ratio", "rule")}
    meta = {"format": FORMAT, "version": VERSION, "model": recipe.model, "tp_size": recipe.tp_size,
            "error_feedback": recipe.error_feedback, "outlier_rule": recipe.outlier_rule, "layers": recipe.layers,
            "calibration": cal_meta, "made_by": recipe.made_by}
    tensors = {k: t.detach().contiguous().cpu() for k, t in sorted(tensors.items())}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={FORMAT_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe; every problem names the file."""
    from safetensors import SafetensorError, safe_open

    from .calibration import _check_layer, tagged_metadata

    try:
        with safe_open(path, framework="pt") as f:
            meta = _read_meta(path, tagged_metadata(path, f.metadata(), FORMAT_KEY, "recipe"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read the recipe {path}: {e}") from e
    tp, hidden = meta["tp_size"], meta["model"]["hidden"]
    stats, channels, bases = {}, {}, {}
    for name, spec in meta["layers"].items():
        try:
            parsed = parse_codec_spec(spec)
        except ValueError as e:
            raise ValueError(f"{path}: layer {name!r}: {e}") from None
        if isinstance(parsed, OutlierSpec):
            keys = [f"{name}.{k}" for k in ("min", "max", "channels")]
            if any(k not in tensors for k in keys):
                raise ValueError(f"{path}: layer {name!r} ({spec}) lacks the tensors {keys}")
            stats[name], channels[name] = (tensors[keys[0]], tensors[keys[1]]), tensors[keys[2]]
        elif isinstance(parsed, LowRankSpec):
            if f"{name}.basis" not in tensors:
                raise ValueError(f"{path}: layer {name!r} ({spec}) lacks its tensor {name}.basis")
            bases[name] = tensors[f"{name}.basis"]
    cal = None
    if stats or bases:
        cal_meta = {**(meta.get("calibration") or {}), "model": meta["model"].get("name"), "tp_size": tp,
                    "hidden": hidden, "layers": sorted(set(stats) | set(bases))}
        for name in cal_meta["layers"]:  # shapes checked against tp and hidden before anything is allocated
            _check_layer(path, name, cal_meta, stats.get(name), channels.get(name, torch.zeros(0, dtype=torch.int64)),
                         bases.get(name))
        cal = Calibration(meta=cal_meta, stats=stats, channels=channels, bases=bases)
    try:
        return Recipe(model=meta["model"], tp_size=tp, layers=meta["layers"], error_feedback=meta["error_feedback"],
                      outlier_rule=meta.get("outlier_rule"), calibration=cal, made_by=meta.get("made_by", {}))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _read_meta(path: str, meta: dict) -> dict:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: its {FORMAT_KEY!r} metadata is not a {FORMAT} object")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: recipe format version {meta.get('version')!r} is not {VERSION}, the version "
                         "this tpcomp-megatron reads; re-make the recipe with this version's tools")
    model = meta.get("model")
    if not isinstance(model, dict) or not all(_count(model.get(k)) for k in ("hidden", "layers")):
        raise ValueError(f"{path}: its model fingerprint lacks 'hidden' and 'layers' (positive integers)")
    if not _count(meta.get("tp_size")) or not isinstance(meta.get("error_feedback"), bool):
        raise ValueError(f"{path}: its metadata lacks 'tp_size' (a positive integer) or 'error_feedback' (bool)")
    if meta.get("calibration") is not None and not isinstance(meta["calibration"], dict):
        raise ValueError(f"{path}: its 'calibration' metadata must be an object or null")
    if meta.get("outlier_rule") is not None and meta["outlier_rule"] not in RULES:
        raise ValueError(f"{path}: its 'outlier_rule' {meta['outlier_rule']!r} is not one of {list(RULES)}")
    if not isinstance(meta.get("made_by", {}), dict):
        raise ValueError(f"{path}: its 'made_by' metadata must be an object")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
        raise ValueError(f"{path}: 'layers' must map layer names to codec specs")
    return meta


def _count(value: Any) -> bool:
    """A positive integer (not a bool) that a tensor dimension can hold."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63
