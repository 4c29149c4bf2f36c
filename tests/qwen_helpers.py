"""Tiny random Hugging Face Qwen2 / Qwen3 models, built offline, and GGUF files written from them.

Every variant has heads that do not divide TP=4 (KV replication and zero query heads), an FFN
that does not divide 4, a rope base that is not the default, norms perturbed away from their ones
init and, for Qwen2, QKV biases drawn large (HF initializes them to zero, which would hide a
dropped bias). Qwen3's head_dim is neither hidden / heads nor Qwen3Config's default 128.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(
    num_hidden_layers=2,
    intermediate_size=90,  # not divisible by 4: FFN padding at TP=4
    vocab_size=256,  # one token per byte: the GGUF can carry a byte-level tokenizer (verify uses it)
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)

# name -> (HF class name, config kwargs)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("Qwen2ForCausalLM", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                        tie_word_embeddings=False, rope_theta=1_000_000.0)),
    "qwen2_tied": ("Qwen2ForCausalLM", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                             tie_word_embeddings=True, rope_theta=5_000.0)),
    "qwen3": ("Qwen3ForCausalLM", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                        head_dim=12, tie_word_embeddings=False, rope_theta=1_000_000.0)),
    "qwen3_tied": ("Qwen3ForCausalLM", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=16, tie_word_embeddings=True, rope_theta=20_000.0)),
}


def hf_config(name: str, **changes: Any) -> Any:
    from transformers import Qwen2Config, Qwen3Config

    arch, kw = VARIANTS[name]
    kw = {**copy.deepcopy(COMMON), **copy.deepcopy(kw), **changes}
    theta = kw.pop("rope_theta")
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": theta})
    cls = Qwen2Config if arch == "Qwen2ForCausalLM" else Qwen3Config
    return cls(architectures=[arch], **kw)


def make_hf_model(name: str, folder: Path | None = None, *, seed: int = 0) -> Any:
    """Variant `name` with weights drawn from `seed` (saved to `folder` if given), fp32, eager."""
    from transformers import AutoModelForCausalLM

    config = hf_config(name)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # ones at init: perturb, so a swapped or dropped norm shows
                p.add_(0.3 * torch.randn_like(p))
            elif n.endswith(".bias"):  # zeros at init: a dropped bias must change the logits
                p.normal_(0.0, 0.5)
    if folder is not None:
        model.save_pretrained(folder)
    return model.eval()


def without_qkv_bias(model: Any) -> Any:
    """The same HF model with every q/k/v bias zeroed (what a converter dropping them gives)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
    return model


def without_qk_norm(model: Any) -> Any:
    """The same HF model with Qwen3's per-head q/k norms removed."""
    for layer in model.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    return model


_GGUF_ARCH = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def _add_byte_tokenizer(w: Any) -> None:
    """A GPT-2-style byte-level BPE without merges, as Qwen GGUFs carry ("gpt2", pre "qwen2"):
    token i is byte i, so any text tokenizes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([b2u[b] for b in range(256)])
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def write_gguf(model: Any, path: Path, *, arch: str | None = None) -> Path:
    """`model` as an F32 GGUF file (llama.cpp's tensor names and metadata keys, a byte-level
    tokenizer), so its de-quantization is exact. `arch` overrides `general.architecture`."""
    import gguf
    import numpy as np

    cfg = model.config
    hf_arch = cfg.architectures[0]
    name = arch or _GGUF_ARCH[hf_arch]
    w = gguf.GGUFWriter(str(path), name)
    w.add_name(f"tiny-{name}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    _add_byte_tokenizer(w)
    model_arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[_GGUF_ARCH[hf_arch]]
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise KeyError(f"no GGUF name for {key}")
        w.add_tensor(gname, t.detach().float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
