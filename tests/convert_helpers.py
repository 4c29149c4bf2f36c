"""Tiny random Hugging Face Llama-family models, built offline, for the converter tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the scaling changes frequencies that a 12-token test actually uses.
    "original_max_position_embeddings": 32,
}

# name -> (config kwargs, how to save). Every one differs from the others in at least one axis the
# converter must get right: MHA/GQA, tied/untied, heads that do not divide TP, FFN that does not
# divide TP, rope scaling kind, dtype, safetensors vs .bin, Llama vs Mistral.
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "mha": (
        dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, head_dim=16),
        "safetensors",
    ),
    "gqa": (
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            hidden_size=64,
            head_dim=8,
            intermediate_size=90,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        "bin",
    ),
    "odd": (
        dict(
            num_attention_heads=9,
            num_key_value_heads=3,
            hidden_size=72,
            head_dim=8,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
        ),
        "safetensors",
    ),
    "mistral": (
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=64,
            head_dim=16,
            dtype="bfloat16",
        ),
        "mistral",
    ),
}


def hf_config(name: str) -> Any:
    from transformers import LlamaConfig, MistralConfig

    kw, kind = VARIANTS[name]
    base: dict[str, Any] = dict(
        num_hidden_layers=2,
        intermediate_size=96,
        vocab_size=250,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    base.update(copy.deepcopy(kw))  # transformers edits rope dicts in place
    if kind == "mistral":
        return MistralConfig(architectures=["MistralForCausalLM"], sliding_window=None, **base)
    return LlamaConfig(architectures=["LlamaForCausalLM"], **base)


def make_hf_model(name: str, folder: Path) -> Any:
    """Save variant `name` to `folder`; return the model in fp32 with eager attention."""
    from transformers import AutoModelForCausalLM

    kw, kind = VARIANTS[name]
    config = hf_config(name)
    torch.manual_seed(sum(map(ord, name)))  # str hash() is salted per process
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random init of norms is all ones; perturb them so a swapped norm cannot go unnoticed.
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    if kw.get("dtype") == "bfloat16":
        model = model.to(torch.bfloat16)
    if kind == "bin":
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return model.float().eval()


def reference_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(tokens).logits.float()


def logit_diff(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(max-abs difference, min per-position cosine) of `[b, s, V]` logits; padded vocab columns
    of `got` are dropped."""
    got = got[..., : ref.shape[-1]]
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), got.flatten(0, 1), dim=-1)
    return (ref - got).abs().max().item(), cos.min().item()


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a HF folder's weight files, as stored."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        from safetensors.torch import load_file

        out.update(load_file(str(f)))
    for f in sorted(folder.glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def assert_round_trip_identical(ckpt: Path, hf_folder: Path, back: Path, fmt: str) -> None:
    """Megatron checkpoint -> Hugging Face again: every tensor (dtype too) and config.json equal
    the original's. No arithmetic happens on the way (padding is added then cut)."""
    from tpcomp_megatron.convert import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, back, fmt=fmt)
    src, dst = stored_tensors(hf_folder), stored_tensors(back)
    assert sorted(src) == sorted(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    assert read_json(back / "config.json") == read_json(hf_folder / "config.json")


def assert_verifies(ckpt: Path, hf_model: Any, vocab_size: int, n_tokens: int, *, max_abs: float,
                    min_cosine: float, timeout_s: int) -> None:
    """`verify_checkpoint` on random ids (natural text would need the GGUF tokenizer, another slow
    parse; the logits comparison does not depend on where the ids come from): within tolerance,
    and the same argmax everywhere."""
    from tpcomp_megatron.convert import verify_checkpoint

    tokens = torch.randint(0, vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    report = verify_checkpoint(ckpt, hf_model=hf_model, tokens=tokens, max_abs=max_abs, min_cosine=min_cosine,
                               timeout_s=timeout_s)
    print(report.summary())
    assert report.ok, report.summary()
    assert report.argmax_agreement == 1.0
