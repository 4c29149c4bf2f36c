"""A tiny random Hugging Face Llama with a character-level tokenizer, built offline, for the
quality-tool tests. Its head counts and FFN do not divide TP=2 (padding heads, padded FFN), so the
simulated split must reproduce the converter's layout to match real ranks."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. "
) * 6
CAL_TEXT = (
    "The Congress assembles this year under the shadow of a great calamity. We meet in the midst of peace and "
    "prosperity, and the condition of the country calls for our thanks and our resolve to keep it so. "
) * 6
VOCAB = 128  # characters map to their code point (ASCII text)
PLANTED = {"o_proj": [5, 40, 77], "down_proj": [12, 60, 90]}  # outlier channels of the `tiny` fixture's model
SEQ, WINDOWS = 64, 2  # the quality tests' window length and count
# 6 heads in 3 KV groups: TP=2 pads with a dummy group; FFN 90 -> 2 x 45; TP=3 splits evenly.
CONFIG = dict(num_hidden_layers=2, hidden_size=96, intermediate_size=90, num_attention_heads=6,
              num_key_value_heads=3, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)


def char_tokenizer():
    """A PreTrainedTokenizerFast whose tokens are single characters (ids = ASCII codes)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0))


def make_tiny_model(folder: Path, *, seed: int = 0, planted: dict[str, list[int]] | None = None):
    """Save a tiny Llama (+ tokenizer) to `folder` and return the fp32 model (eager attention).

    `planted`: per kind ('o_proj' / 'down_proj'), output channels whose weight rows are scaled up,
    so their partial sums are outliers on every rank.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(architectures=["LlamaForCausalLM"], **CONFIG)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5.0)  # init std 0.02 makes near-constant logits; a peakier model is a better test
        for layer in model.model.layers:
            for kind, rows in (planted or {}).items():
                lin = layer.self_attn.o_proj if kind == "o_proj" else layer.mlp.down_proj
                lin.weight[rows] *= 30.0
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return model.eval()


def write_text(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return f"file:{path}"


def quiet(*_a) -> None:
    """A `log` that prints nothing."""
