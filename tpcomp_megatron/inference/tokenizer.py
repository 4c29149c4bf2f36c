"""The model's own tokenizer: SentencePiece `tokenizer.model` (Llama 2, Gemma) or Hugging Face's."""

from __future__ import annotations

from pathlib import Path

from ..models.core.config import TokenizerRef


class SentencePieceTokenizer:
    """The `encode`/`decode` subset of a HF tokenizer, over a SentencePiece model file."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_token_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.sp.decode(list(ids))


def load_tokenizer(ref: TokenizerRef | None):
    """A tokenizer with `encode(text) -> ids`, `decode(ids) -> str` and `eos_token_id`.

    Hugging Face folders with `tokenizer.json` use transformers' fast tokenizer; folders with only
    a SentencePiece `tokenizer.model` use SentencePiece directly; GGUF files use the vocabulary
    transformers reads from them.
    """
    if ref is None:
        raise ValueError("the checkpoint records no tokenizer location; convert from a folder or GGUF "
                         "that has one, or pass --tokenizer PATH")
    folder = Path(ref.path)
    if not folder.exists():
        raise FileNotFoundError(f"tokenizer location {folder} does not exist (moved since conversion?); pass --tokenizer PATH")
    if ref.gguf_file is None and (folder / "tokenizer.model").exists() and not (folder / "tokenizer.json").exists():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    return AutoTokenizer.from_pretrained(str(folder), **kwargs)
