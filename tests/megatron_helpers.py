"""Tiny Megatron models on CPU gloo ranks, shared by the layer and end-to-end tests."""

from __future__ import annotations

import torch


def init_megatron(tp: int, seed: int = 1234):
    """Inside a rank of run_ranks: Megatron's parallel state at TP=tp, seeded; returns the CPU context."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tpcomp_megatron.megatron.cpu import cpu_megatron

    ctx = cpu_megatron()
    ctx.__enter__()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ctx


def tiny_config(tp: int, *, sp: bool = False, layers: int = 2):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=layers, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8,
        num_query_groups=4, kv_channels=8, tensor_model_parallel_size=tp, sequence_parallel=sp,
        use_cpu_initialization=True, params_dtype=torch.float32, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, normalization="RMSNorm",
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        persist_layer_norm=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, init_method_std=0.05,
    )


def one_row_parallel_layer(world, size):
    """A module holding one stock `self_attention.linear_proj` of `size` x `size`."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    model = torch.nn.Module()
    model.self_attention = torch.nn.Module()
    model.self_attention.linear_proj = RowParallelLinear(size, size, config=tiny_config(world),
                                                         init_method=torch.nn.init.zeros_, bias=False,
                                                         input_is_parallel=True, skip_bias_add=True)
    return model


def tiny_gpt(tp: int, *, sp: bool = False, vocab: int = 256, core_attention=None):
    """A Llama-style GPTModel (RMSNorm, SwiGLU, GQA, RoPE, untied output) on the local spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from tpcomp_megatron.models.core.norm import RMSNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # The local spec's torch norm refuses sequence parallelism; ours marks its params for it.
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    cfg = tiny_config(tp, sp=sp)
    block = TransformerBlockSubmodules(layer_specs=[spec] * cfg.num_layers, layer_norm=RMSNorm)
    return GPTModel(config=cfg, transformer_layer_spec=block, vocab_size=vocab,
                    max_sequence_length=64, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False, parallel_output=False)


def shard_state_dict(full: dict, tp: int, rank: int, ffn: int = 160) -> dict:
    """Split a TP=1 state dict for `rank` of `tp` (an independent re-statement of Megatron's
    layouts: qkv by query groups, fc1 as [gate_r; up_r], proj/fc2 by input columns, vocab rows)."""
    out = {}
    for k, v in full.items():
        if v is None or not torch.is_tensor(v):
            out[k] = v
        elif k.endswith("linear_fc1.weight"):
            gate, up = v[:ffn], v[ffn:]
            out[k] = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
        elif k.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
            out[k] = v.chunk(tp, dim=0)[rank].clone()
        elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
            out[k] = v.chunk(tp, dim=1)[rank].clone()
        else:
            out[k] = v.clone()
    return out
