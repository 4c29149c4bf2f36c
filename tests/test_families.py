"""The model-family registry (`models/core/families.py`): each family registered once, found by every
name a source gives, unknown names refused naming them, a family registered from outside picked
up by the base modules untouched, and no import cycle inside `tpcomp_megatron/models/`."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tpcomp_megatron.models import (
    GemmaModelConfig,
    LlamaModelConfig,
    QwenModelConfig,
    config_from_hf,
    families,
    model_config_from_dict,
    supported_architectures,
)
from tpcomp_megatron.models.core.builder import llama_model_parts, model_parts
from tpcomp_megatron.models.gemma import gemma_config_from_hf
from tpcomp_megatron.models.core.hf_config import check_architecture, rope_fields

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = {"llama": LlamaModelConfig, "gemma": GemmaModelConfig, "qwen": QwenModelConfig}
_SIZES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=250)


def test_every_family_is_registered_once():
    names = [f.name for f in families.families()]
    assert sorted(names) == sorted(BUILT_IN) and len(set(names)) == len(names)
    assert {f.name: f.config_class for f in families.families()} == BUILT_IN
    archs = [a for f in families.families() for a in f.architectures]
    ggufs = [g for f in families.families() for g in f.gguf_architectures]
    assert len(set(archs)) == len(archs) and len(set(ggufs)) == len(ggufs)
    assert supported_architectures() == sorted(archs)
    for family in families.families():  # a second registration of anything is refused
        with pytest.raises(ValueError, match="already registered"):
            families.register(family)
        with pytest.raises(ValueError, match=f"claims what family '{family.name}' has"):
            families.register(dataclasses.replace(family, name=family.name + "-again"))
    assert [f.name for f in families.families()] == names


@pytest.mark.parametrize("family", families.families(), ids=lambda f: f.name)
def test_lookups_give_the_record(family):
    for arch, model_type in family.architectures.items():
        assert families.by_hf_architecture(arch) is family
        assert families.by_model_type(model_type) is family
        assert families.for_hf_config({"architectures": [arch]}) == (family, arch)
        assert families.for_hf_config({"model_type": model_type})[0] is family
    for gguf, arch in family.gguf_architectures.items():
        assert families.by_gguf_architecture(gguf) is family
        assert families.gguf_architectures()[gguf] == arch and arch in family.architectures
    assert families.by_config(family.config_class) is family
    assert families.by_name(family.name) is family


def test_config_subclass_finds_its_nearest_registered_base():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyGemma(GemmaModelConfig):
        pass

    assert families.by_config(MyGemma).name == "gemma"


def test_unknown_architecture_is_named_with_the_known_ones():
    known = ", ".join(supported_architectures())
    with pytest.raises(ValueError, match=f"unsupported architecture 'FooForCausalLM'; supported: {known}$"):
        families.by_hf_architecture("FooForCausalLM")
    with pytest.raises(ValueError, match=r"unsupported architecture \['FooForCausalLM'\]; supported: .*LlamaForCausalLM"):
        config_from_hf({**_SIZES, "architectures": ["FooForCausalLM"]}, tensor_parallel_size=1)
    with pytest.raises(ValueError, match=r"unsupported architecture 'foo_type'"):
        check_architecture({"model_type": "foo_type"})
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'foo'; supported: llama \(LlamaForCausalLM\)"):
        families.by_gguf_architecture("foo")
    with pytest.raises(ValueError, match="ConditionalGeneration"):  # a refused class says why
        check_architecture({"architectures": ["Gemma3ForConditionalGeneration"]})
    with pytest.raises(ValueError, match="must be a list"):
        check_architecture({"architectures": "LlamaForCausalLM"})
    with pytest.raises(ValueError, match="no model family has config class dict"):
        families.by_config({})


def test_family_reader_refuses_other_families():
    with pytest.raises(ValueError, match="not a gemma config"):
        gemma_config_from_hf({**_SIZES, "architectures": ["LlamaForCausalLM"]}, tensor_parallel_size=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyConfig(LlamaModelConfig):
    """A Llama-like family defined outside the package."""

    FORMAT: ClassVar[str] = "tpcomp-tiny-config/1"
    hf_architecture: str = "TinyLlamaForCausalLM"


def _read_tiny(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> TinyConfig:
    return TinyConfig(**rope_fields(hf), **fields)


@pytest.fixture
def tiny():
    family = families.register(families.Family(
        name="tiny",
        config_class=TinyConfig,
        architectures={"TinyLlamaForCausalLM": "tiny_llama"},
        read_hf=_read_tiny,
        model_parts=llama_model_parts,
        gguf_architectures={"tinyllama": "TinyLlamaForCausalLM"},
        max_positions=512,
    ))
    try:
        yield family
    finally:
        families.unregister("tiny")


def test_a_family_registered_from_outside_is_picked_up(tiny):
    hf = {**_SIZES, "architectures": ["TinyLlamaForCausalLM"], "rope_theta": 5e5}
    cfg = config_from_hf(hf, tensor_parallel_size=2)
    assert type(cfg) is TinyConfig and cfg.hf_architecture == "TinyLlamaForCausalLM"
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.padded_vocab_size) == (5e5, 512, 256)
    assert model_config_from_dict(cfg.to_dict()) == cfg  # the JSON reader finds its format too
    assert "TinyLlamaForCausalLM" in supported_architectures()
    assert families.by_gguf_architecture("tinyllama") is tiny and families.by_config(cfg) is tiny
    parts = model_parts(cfg)  # the builder asks the registry
    assert len(parts.layer_specs) == cfg.num_layers


def test_an_unregistered_family_is_gone():
    hf = {**_SIZES, "architectures": ["TinyLlamaForCausalLM"]}
    with pytest.raises(ValueError, match=r"unsupported architecture \['TinyLlamaForCausalLM'\]"):
        config_from_hf(hf, tensor_parallel_size=1)
    with pytest.raises(ValueError, match="unknown config format 'tpcomp-tiny-config/1'"):
        model_config_from_dict({"format": TinyConfig.FORMAT})
    assert [f.name for f in families.families()] == ["llama", "gemma", "qwen"]


def _import_graph_tool() -> Any:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_in_models(capsys):
    tool = _import_graph_tool()
    graph = tool.import_graph()
    assert graph["tpcomp_megatron.models.core.families"] == set()  # the registry imports no family
    core = [m for m in graph if m.startswith("tpcomp_megatron.models.core")]
    assert len(core) >= 8  # config, hf_config, builder, families, ...: none imports a family
    for module in core:
        imported = graph[module]
        assert not any(m.startswith(("tpcomp_megatron.models.gemma", "tpcomp_megatron.models.qwen",
                                     "tpcomp_megatron.models.llama")) for m in imported), module
    assert tool.main(["--cycles", "tpcomp_megatron.models"]) == 0, capsys.readouterr().out
    # and the tool does see a cycle when there is one
    assert tool.cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [(["a", "b"], [["a", "b", "a"]])]
