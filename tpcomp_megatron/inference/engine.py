"""Generation through Megatron-core's own inference engine (GPU only: it needs CUDA streams).

The engine drives the model with its static KV cache and text-generation controller; compression
applied with `apply_tp_compression` is active inside it like in any forward. Megatron's controller
expects its own tokenizer interface, so HF / SentencePiece tokenizers are adapted here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


class MegatronTokenizerAdapter:
    """The subset of Megatron's tokenizer interface the text-generation controller calls."""

    def __init__(self, tok, vocab_size: int):
        self.tok = tok
        self.vocab_size = vocab_size
        self.bos = getattr(tok, "bos_token_id", None)
        eos = getattr(tok, "eos_token_id", None)
        self.eod = eos if eos is not None else -1

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def detokenize(self, ids, **kwargs) -> str:
        return self.tok.decode([int(i) for i in ids])

    def offsets(self, ids, text):  # only used for log-prob segmentation, which we do not request
        raise NotImplementedError


@dataclass
class EngineResult:
    text: str
    tokens: list[int]
    seconds: float


def engine_generate(model, tok, prompt: str, max_new_tokens: int, *, vocab_size: int,
                    padded_vocab_size: int, hidden_size: int, dtype: torch.dtype, max_seq: int) -> EngineResult:
    """Greedy generation of one prompt through `StaticInferenceEngine` (legacy static batching)."""
    if not torch.cuda.is_available():
        raise RuntimeError("Megatron's inference engine needs CUDA; on CPU use --engine loop")
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    try:  # megatron-core <= 0.16: the wrapper takes its own config
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    except ImportError:  # later: it reads the model's TransformerConfig, the context holds the limits
        wrapped = GPTInferenceWrapper(model, StaticInferenceContext(max_batch_size=1, max_sequence_length=max_seq))
    else:
        cfg = InferenceWrapperConfig(hidden_size=hidden_size, params_dtype=dtype,
                                     inference_batch_times_seqlen_threshold=-1, padded_vocab_size=padded_vocab_size,
                                     inference_max_requests=1, inference_max_seq_length=max_seq)
        wrapped = GPTInferenceWrapper(model, cfg, StaticInferenceContext.from_config(cfg))
    controller = TextGenerationController(wrapped, MegatronTokenizerAdapter(tok, vocab_size))
    engine = StaticInferenceEngine(controller, max_batch_size=1, legacy=True)
    params = SamplingParams(top_k=1, num_tokens_to_generate=max_new_tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    (res,) = engine.generate(prompts=[prompt], sampling_params=params)
    torch.cuda.synchronize()
    toks = res.generated_tokens
    toks = toks.tolist() if torch.is_tensor(toks) else list(toks)
    return EngineResult(text=res.generated_text, tokens=toks, seconds=time.perf_counter() - t0)
