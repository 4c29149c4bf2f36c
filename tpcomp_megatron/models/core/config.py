"""The model config: everything needed to rebuild TransformerConfig + GPTModel.

`LlamaModelConfig` is the Llama family's config (Llama, Mistral, SmolLM2) and the base class of
every other family's (`gemma/config.py`, `qwen/config.py`): each adds its fields and its `FORMAT`
tag. `load_model_config` / `model_config_from_dict` read any registered family's JSON, the class
chosen by that tag from the registry (`families`), so this module imports no family.

One JSON file travels with every converted checkpoint. It records the original shapes (for the
reverse conversion and for trimming padded logits) and the padded ones the checkpoint was written
with (vocab padded to a multiple of `make_vocab_size_divisible_by * TP`, FFN padded to TP, heads laid
out by `HeadLayout`), plus where the tokenizer lives.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

from . import families
from .heads import HeadLayout, plan_head_layout
from .rope import RopeScaling

FORMAT = "tpcomp-llama-config/1"
DTYPES = ("float32", "bfloat16", "float16")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerRef:
    """Where to load the tokenizer from (transformers `AutoTokenizer.from_pretrained`)."""

    path: str
    """A Hugging Face model folder, or the folder holding `gguf_file`."""
    gguf_file: str | None = None
    """File name of a GGUF inside `path`, when the tokenizer comes from a GGUF."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("tokenizer path must not be empty")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaModelConfig:
    """A Llama-family decoder (Llama 2/3.x, Mistral, SmolLM2) at one tensor-parallel size."""

    FORMAT: ClassVar[str] = FORMAT
    """The `format` tag of this class's JSON; subclasses (other families) have their own."""

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """SwiGLU intermediate size of the original model."""
    num_attention_heads: int
    """Original query heads."""
    num_kv_heads: int
    """Original KV heads (equal to num_attention_heads for MHA)."""
    head_dim: int
    """Per-head width (may differ from hidden_size / heads)."""
    vocab_size: int
    """Original vocabulary size; logits past it are padding."""
    max_position_embeddings: int
    """Longest sequence the model was configured for."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary base."""
    rope_scaling: RopeScaling | None = None
    """Rotary scaling (Llama 3 style or linear), None for plain rope."""
    tie_word_embeddings: bool = False
    """Output layer shares the input embedding."""
    tensor_parallel_size: int = 1
    """TP size the padded shapes were chosen for."""
    make_vocab_size_divisible_by: int = 128
    """Vocab is padded to a multiple of this times tensor_parallel_size."""
    padded_vocab_size: int | None = None
    """Rows of the embedding/output layer; derived when None."""
    padded_ffn_hidden_size: int | None = None
    """FFN size after zero padding to a multiple of TP; derived when None."""
    kv_replication: int | None = None
    """Copies of each KV group (HeadLayout); derived for tensor_parallel_size when None."""
    dummy_kv_groups: int | None = None
    """All-zero groups appended (HeadLayout); derived with kv_replication."""
    params_dtype: str = "float32"
    """Dtype the checkpoint tensors are stored in: float32, bfloat16 or float16."""
    tokenizer: TokenizerRef | None = None
    """Where the tokenizer lives, if known."""
    source: str | None = None
    """The Hugging Face folder or GGUF file this was converted from (used by --verify)."""
    hf_architecture: str = "LlamaForCausalLM"
    """Hugging Face class name, for the reverse conversion."""
    hf_config: dict[str, Any] | None = None
    """The source config.json as read, written back verbatim by the reverse conversion."""

    def __post_init__(self) -> None:
        positive = (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
            "tensor_parallel_size",
            "make_vocab_size_divisible_by",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(
                f"rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps}, "
                f"{self.rope_theta}"
            )
        if self.params_dtype not in DTYPES:
            raise ValueError(f"params_dtype must be one of {DTYPES}, got {self.params_dtype!r}")
        tp = self.tensor_parallel_size
        vocab_multiple = self.make_vocab_size_divisible_by * tp
        self._derive("padded_vocab_size", _round_up(self.vocab_size, vocab_multiple))
        self._derive("padded_ffn_hidden_size", _round_up(self.ffn_hidden_size, tp))
        if (self.kv_replication is None) != (self.dummy_kv_groups is None):
            raise ValueError("set both kv_replication and dummy_kv_groups, or neither")
        if self.kv_replication is None:
            plan = plan_head_layout(self.num_attention_heads, self.num_kv_heads, tp)
            self._derive("kv_replication", plan.kv_replication)
            self._derive("dummy_kv_groups", plan.dummy_groups)
        layout = self.head_layout  # validates the head counts
        layout.check_divides(tp)
        if self.padded_vocab_size < self.vocab_size or self.padded_vocab_size % tp:
            raise ValueError(
                f"padded_vocab_size={self.padded_vocab_size} must be >= vocab_size="
                f"{self.vocab_size} and divisible by TP={tp}; leave it unset to derive it"
            )
        if self.padded_ffn_hidden_size < self.ffn_hidden_size or self.padded_ffn_hidden_size % tp:
            raise ValueError(
                f"padded_ffn_hidden_size={self.padded_ffn_hidden_size} must be >= "
                f"ffn_hidden_size={self.ffn_hidden_size} and divisible by TP={tp}"
            )

    def _derive(self, name: str, value: Any) -> None:
        if getattr(self, name) is None:
            object.__setattr__(self, name, value)

    @property
    def post_norms(self) -> bool:
        """Norms after attention and after the MLP (none in Llama; Gemma 2/3 override)."""
        return False

    @property
    def qk_norm(self) -> bool:
        """Per-head norms of queries and keys (none in Llama; Gemma 3 and Qwen3 override)."""
        return False

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k and v projections (none in Llama; Qwen2 overrides)."""
        return False

    @property
    def head_layout(self) -> HeadLayout:
        """Padded attention-head layout of the checkpoint."""
        return HeadLayout(
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_kv_heads,
            kv_replication=int(self.kv_replication or 1),
            dummy_groups=int(self.dummy_kv_groups or 0),
        )

    def with_tensor_parallel_size(self, tp: int) -> "LlamaModelConfig":
        """The same model with padding re-derived for another TP size (a new checkpoint layout)."""
        return dataclasses.replace(
            self,
            tensor_parallel_size=tp,
            padded_vocab_size=None,
            padded_ffn_hidden_size=None,
            kv_replication=None,
            dummy_kv_groups=None,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["format"] = type(self).FORMAT
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlamaModelConfig":
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != cls.FORMAT:
            raise ValueError(
                f"not a {cls.FORMAT} config (format={fmt!r}); was it written by tpcomp? "
                "(load_model_config reads every model family)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if data.get("tokenizer") is not None:
            data["tokenizer"] = TokenizerRef(**data["tokenizer"])
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LlamaModelConfig":
        return cls.from_dict(_read_json_object(path))


def _config_classes() -> list[type[LlamaModelConfig]]:
    """The config class of every registered family, in registration order."""
    return [f.config_class for f in families.families()]


def model_config_from_dict(data: dict[str, Any]) -> LlamaModelConfig:
    """The config of whichever model family wrote `data` (its `format` tag decides)."""
    fmt = data.get("format")
    for cls in _config_classes():
        if fmt == cls.FORMAT:
            return cls.from_dict(data)
    known = [c.FORMAT for c in _config_classes()]
    raise ValueError(f"unknown config format {fmt!r}; known: {known}. Was it written by tpcomp?")


def _read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def load_model_config(path: str | os.PathLike[str]) -> LlamaModelConfig:
    """Read a config JSON written by any model family's `save`."""
    return model_config_from_dict(_read_json_object(path))
