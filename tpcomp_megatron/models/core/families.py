"""The model-family registry: one `Family` record per family, looked up by what a source names.

A family is a config class plus what converts to it and builds it: the Hugging Face classes and
model types it reads, the GGUF architectures it reads, its config.json reader, its GGUF fix-ups
and its Megatron layer specs. The base modules ask the registry, never a family by name:
`config.model_config_from_dict` (by `format` tag), `hf_config.config_from_hf` (by architecture or
model type), `builder.build_gpt_model` (by config class), `convert.gguf_source` (by GGUF
architecture).

The families register themselves on import: `tpcomp_megatron.models` (its `__init__`, which
Python runs before any module inside it) imports `models/llama.py` (Llama, Mistral, SmolLM2, on the
base modules), `models/gemma/` and `models/qwen/`, each of which calls `register` once. This module
imports nothing of the package, so every family can import it. A new family is one folder that
registers its record, and one line importing it in `models/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

HFReader = Callable[[dict[str, Any], str, dict[str, Any]], Any]
"""`(config.json dict, its HF class, the shared fields of hf_config.common_fields) -> config`:
checks what the family refuses and adds its own fields (rope included)."""
GGUFReader = Callable[[str, Mapping[str, Any]], dict[str, Any]]
"""`(GGUF architecture, header metadata) -> HF config fields` that transformers' GGUF loader
misses or gets wrong for this family ({} when it reads this file right)."""
PartsBuilder = Callable[[Any, Any], Any]
"""`(config, layer_spec_transform or None) -> builder.ModelParts`: the Megatron layer specs."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its config class and the readers and builders that go with it."""

    name: str
    """Short unique name ("llama", "gemma", "qwen")."""
    config_class: type
    """The `LlamaModelConfig` subclass (or the class itself) this family's configs are."""
    architectures: Mapping[str, str]
    """Hugging Face class name -> its `model_type`, for every class the family converts."""
    read_hf: HFReader
    """Reads a config.json of one of `architectures` into a `config_class` (see `HFReader`)."""
    model_parts: PartsBuilder
    """Builds the layer specs, final norm and post-build steps (see `PartsBuilder`)."""
    transformer_overrides: Callable[[Any], dict[str, Any]] | None = None
    """TransformerConfig fields that differ from the Llama defaults of `builder.transformer_config`."""
    gguf_architectures: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """GGUF `general.architecture` -> the Hugging Face class it converts as (only those that
    transformers' GGUF loader reads too)."""
    read_gguf: GGUFReader | None = None
    """Fix-ups of transformers' reading of this family's GGUFs (see `GGUFReader`); None if none."""
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Hugging Face classes close to this family's that are refused -> why (the error message)."""
    max_positions: int = 4096
    """`max_position_embeddings` when config.json has none."""
    tie_embeddings: bool = False
    """`tie_word_embeddings` when config.json has none."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a family needs a name")
        if not isinstance(self.config_class, type):
            raise TypeError(f"family {self.name!r}: config_class must be a class, got {self.config_class!r}")
        if not self.architectures:
            raise ValueError(f"family {self.name!r} names no Hugging Face architecture")
        for name in ("architectures", "gguf_architectures", "refused"):
            object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))
        strays = sorted(set(self.gguf_architectures.values()) - set(self.architectures))
        if strays:
            raise ValueError(f"family {self.name!r}: GGUF architectures convert as {strays}, "
                             f"which are not among its architectures {sorted(self.architectures)}")

    @property
    def model_types(self) -> tuple[str, ...]:
        """The `model_type`s of `architectures`."""
        return tuple(dict.fromkeys(self.architectures.values()))


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add `family` (returned, so a module can keep it as a constant); ValueError if its name,
    config class (or its `FORMAT` tag), an architecture, model type or GGUF architecture is
    already another family's."""
    if family.name in _FAMILIES:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    for other in _FAMILIES.values():
        clashes = _shared(family, other)
        if clashes:
            raise ValueError(f"family {family.name!r} claims what family {other.name!r} has: {', '.join(clashes)}")
    _FAMILIES[family.name] = family
    return family


def _shared(a: Family, b: Family) -> list[str]:
    """What two families both claim (each must be one family's only)."""
    out = []
    if a.config_class is b.config_class:
        out.append(f"config class {a.config_class.__name__}")
    fmt = getattr(a.config_class, "FORMAT", None)
    if fmt is not None and fmt == getattr(b.config_class, "FORMAT", None):
        out.append(f"format {fmt!r}")
    out += sorted(set(a.architectures) & set(b.architectures))
    out += [f"model_type {t!r}" for t in sorted(set(a.model_types) & set(b.model_types))]
    out += [f"GGUF {g!r}" for g in sorted(set(a.gguf_architectures) & set(b.gguf_architectures))]
    return out


def unregister(name: str) -> Family:
    """Remove the family called `name` (tests); returns it."""
    try:
        return _FAMILIES.pop(name)
    except KeyError:
        raise ValueError(f"no model family named {name!r}; registered: {sorted(_FAMILIES)}") from None


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def by_name(name: str) -> Family:
    """The family called `name`; ValueError listing the registered ones otherwise."""
    if isinstance(name, str) and name in _FAMILIES:
        return _FAMILIES[name]
    raise ValueError(f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}")


def hf_architectures() -> list[str]:
    """Every Hugging Face class name some family converts, sorted."""
    return sorted(a for f in _FAMILIES.values() for a in f.architectures)


def gguf_architectures() -> dict[str, str]:
    """GGUF architecture -> the Hugging Face class it converts as, over every family."""
    return {g: c for f in _FAMILIES.values() for g, c in f.gguf_architectures.items()}


def unsupported_architecture(what: object) -> ValueError:
    """The error for a source no family converts, naming it and every class that is converted."""
    return ValueError(f"unsupported architecture {what!r}; supported: {', '.join(hf_architectures())}")


def by_hf_architecture(name: str) -> Family:
    """The family that converts the Hugging Face class `name`."""
    for family in _FAMILIES.values():
        if isinstance(name, str) and name in family.architectures:
            return family
    raise unsupported_architecture(name)


def by_model_type(model_type: str) -> Family:
    """The family with a class of this Hugging Face `model_type`."""
    for family in _FAMILIES.values():
        if isinstance(model_type, str) and model_type in family.model_types:
            return family
    raise unsupported_architecture(model_type)


def by_gguf_architecture(arch: str) -> Family:
    """The family that reads GGUFs of `general.architecture` `arch`."""
    for family in _FAMILIES.values():
        if isinstance(arch, str) and arch in family.gguf_architectures:
            return family
    supported = ", ".join(f"{a} ({c})" for a, c in gguf_architectures().items())
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {supported}")


def by_config(config: Any) -> Family:
    """The family of a config (or config class): its own class's, else its nearest base's."""
    cls = config if isinstance(config, type) else type(config)
    for base in cls.__mro__:
        for family in _FAMILIES.values():
            if family.config_class is base:
                return family
    known = ", ".join(f.config_class.__name__ for f in _FAMILIES.values())
    raise ValueError(f"no model family has config class {cls.__name__}; registered: {known}")


def for_hf_config(hf: Mapping[str, Any]) -> tuple[Family, str]:
    """(family, Hugging Face class) of a config.json dict: the first of its `architectures` that
    a family converts; by `model_type` only when it lists none. ValueError naming what it lists
    and the supported classes otherwise, or why a refused class is refused."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, (list, tuple)):
        raise ValueError(f"config.json field 'architectures' must be a list of class names, got {archs!r:.60}")
    for arch in archs:
        if not isinstance(arch, str):
            continue
        for family in _FAMILIES.values():
            if arch in family.architectures:
                return family, arch
            if arch in family.refused:
                raise ValueError(family.refused[arch])
    if not archs:
        model_type = hf.get("model_type")
        for family in _FAMILIES.values():
            for arch, arch_type in family.architectures.items():
                if isinstance(model_type, str) and arch_type == model_type:
                    return family, arch
    raise unsupported_architecture(archs or hf.get("model_type"))
