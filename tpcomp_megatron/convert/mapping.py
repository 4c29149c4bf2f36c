"""Hugging Face Llama / Gemma / Qwen <-> Megatron-core tensors: key map, padding, per-rank sharding.

Two steps, each with its exact inverse (tested by round trips):

1. `hf_to_megatron` / `megatron_to_hf`: HF names <-> Megatron names in the *global* layout (what a
   TP=1 model holds), with the padding that makes the checkpoint split over TP ranks:
   - `linear_qkv` rows per query group `[q heads of the group, k, v]` (no rotary un-permute: both
     use rotate-half), groups laid out by `HeadLayout` (replicated KV groups, zero query heads);
     its bias (Qwen2) in the same order;
   - `linear_proj` columns per padded query head, zero for padding heads;
   - `linear_fc1` = `[gate; up]`, FFN padded with zero rows (silu(0) * 0 = 0) and zero
     `linear_fc2` columns;
   - embedding and output rows padded with zeros up to the padded vocab.
2. `shard_for_rank` / `merge_shards`: global <-> rank r of TP (rows, columns, or gate/up halves).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from tpcomp_megatron.models.core.config import LlamaModelConfig

# Split dimension of each Megatron tensor kind; "glu" is fc1's per-half row split.
_ROW, _COL, _GLU, _REPL = "row", "col", "glu", "replicated"

EXTRA_STATE_LINEARS = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


class MappingError(ValueError):
    """A checkpoint's tensors do not match the config (missing, unexpected, or wrong shape)."""


def layer_norm_keys(cfg: LlamaModelConfig) -> list[tuple[str, str, int]]:
    """Per-layer norms as (HF suffix, Megatron suffix, size). Note the trap: HF's
    `post_attention_layernorm` is the pre-MLP norm in Llama and Gemma 1, but a norm of the attention
    output in Gemma 2/3 (whose pre-MLP norm is `pre_feedforward_layernorm`)."""
    h, d = cfg.hidden_size, cfg.head_dim
    keys = [("input_layernorm.weight", "input_layernorm.weight", h)]
    if cfg.post_norms:
        keys += [
            ("post_attention_layernorm.weight", "self_attention.post_layernorm.weight", h),
            ("pre_feedforward_layernorm.weight", "pre_mlp_layernorm.weight", h),
            ("post_feedforward_layernorm.weight", "mlp.post_layernorm.weight", h),
        ]
    else:
        keys.append(("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", h))
    if cfg.qk_norm:
        keys += [
            ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", d),
            ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", d),
        ]
    return keys


def expected_hf_shapes(cfg: LlamaModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of `cfg` must hold, with its shape."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    nq, nkv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    linears = {
        "self_attn.q_proj.weight": (nq, h),
        "self_attn.k_proj.weight": (nkv, h),
        "self_attn.v_proj.weight": (nkv, h),
        "self_attn.o_proj.weight": (h, nq),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if cfg.qkv_bias:
        linears.update({"self_attn.q_proj.bias": (nq,), "self_attn.k_proj.bias": (nkv,),
                        "self_attn.v_proj.bias": (nkv,)})
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({p + k: s for k, s in linears.items()})
        out.update({p + hk: (n,) for hk, _, n in layer_norm_keys(cfg)})
    return out


def check_hf_tensors(cfg: LlamaModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise MappingError naming missing/unexpected tensors and shape mismatches."""
    if cfg.num_layers > len(shapes):  # every layer has tensors: bound the count before listing them
        raise MappingError(f"config.json field 'num_hidden_layers' is {cfg.num_layers}, but the checkpoint holds "
                           f"only {len(shapes)} tensors; check that the weights and config.json come from the same model")
    want = expected_hf_shapes(cfg)
    # Tied checkpoints sometimes also store lm_head (equal to the embedding); rotary caches are
    # recomputed from the config, so both are harmless extras.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = sorted(
        k for k in shapes if k not in want and k not in ignorable and "rotary_emb" not in k
    )
    missing = sorted(k for k in want if k not in shapes)
    wrong = [
        f"{k}: {tuple(shapes[k])} != {want[k]}"
        for k in want
        if k in shapes and tuple(shapes[k]) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_short(extra)}")
    if wrong:
        problems.append(f"shape mismatches {_short(wrong)}")
    if problems:
        raise MappingError(
            "the checkpoint does not match its config.json (" + "; ".join(problems) + "); check "
            "that the weights and config.json come from the same model"
        )


def _short(items: list[str], n: int = 6) -> str:
    return str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def _qkv(cfg: LlamaModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    layout, d = cfg.head_layout, cfg.head_dim
    qh, kh, vh = q.view(-1, d, q.shape[1]), k.view(-1, d, k.shape[1]), v.view(-1, d, v.shape[1])
    zero = q.new_zeros(d, q.shape[1])
    qsrc, ksrc, per = layout.query_sources(), layout.kv_sources(), layout.padded_heads_per_group
    rows: list[torch.Tensor] = []
    for g, src in enumerate(ksrc):
        rows += [qh[s] if s >= 0 else zero for s in qsrc[g * per : (g + 1) * per]]
        rows += [kh[src], vh[src]] if src >= 0 else [zero, zero]
    return torch.cat(rows)


def _unqkv(
    cfg: LlamaModelConfig, qkv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout, d = cfg.head_layout, cfg.head_dim
    per = layout.padded_heads_per_group
    groups = qkv.view(layout.padded_num_kv_heads, per + 2, d, qkv.shape[1])
    q: list[torch.Tensor | None] = [None] * layout.num_heads
    k: list[torch.Tensor | None] = [None] * layout.num_kv_heads
    v: list[torch.Tensor | None] = [None] * layout.num_kv_heads
    qsrc = layout.query_sources()
    for g, src in enumerate(layout.kv_sources()):
        for s in range(per):
            orig = qsrc[g * per + s]
            if orig >= 0:
                q[orig] = groups[g, s]
        # Replicas hold identical copies; the first one is as good as any.
        if src >= 0 and k[src] is None:
            k[src], v[src] = groups[g, per], groups[g, per + 1]
    return torch.cat(q), torch.cat(k), torch.cat(v)  # type: ignore[arg-type]


def _qkv_bias(cfg: LlamaModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The bias of `linear_qkv`: each bias as a one-column weight, laid out by `_qkv`."""
    return _qkv(cfg, q[:, None], k[:, None], v[:, None])[:, 0]


def _unqkv_bias(
    cfg: LlamaModelConfig, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _unqkv(cfg, bias[:, None])
    return q[:, 0], k[:, 0], v[:, 0]


def _proj(cfg: LlamaModelConfig, o: torch.Tensor) -> torch.Tensor:
    d = cfg.head_dim
    zero = o.new_zeros(o.shape[0], d)
    cols = [o[:, s * d : (s + 1) * d] if s >= 0 else zero for s in cfg.head_layout.query_sources()]
    return torch.cat(cols, dim=1)


def _unproj(cfg: LlamaModelConfig, proj: torch.Tensor) -> torch.Tensor:
    d, srcs = cfg.head_dim, cfg.head_layout.query_sources()
    cols: list[torch.Tensor | None] = [None] * cfg.num_attention_heads
    for j, s in enumerate(srcs):
        if s >= 0:
            cols[s] = proj[:, j * d : (j + 1) * d]
    return torch.cat(cols, dim=1)  # type: ignore[arg-type]


def megatron_layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def hf_to_megatron(
    cfg: LlamaModelConfig,
    get: Callable[[str], torch.Tensor],
    *,
    on_layer: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Global (TP=1 layout, padded) Megatron tensors from HF tensors fetched by name with `get`.

    Tensors are cast to `cfg.params_dtype`. `on_layer(i)` is called after each layer (progress).
    """
    from tpcomp_megatron.models.core.builder import torch_dtype

    dtype = torch_dtype(cfg.params_dtype)

    def g(name: str) -> torch.Tensor:
        return get(name).to(dtype).contiguous()

    vp, fp, f = (
        int(cfg.padded_vocab_size or 0),
        int(cfg.padded_ffn_hidden_size or 0),
        cfg.ffn_hidden_size,
    )
    out = {"embedding.word_embeddings.weight": _pad_rows(g("model.embed_tokens.weight"), vp)}
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}.", megatron_layer_prefix(i)
        gate, up = g(hp + "mlp.gate_proj.weight"), g(hp + "mlp.up_proj.weight")
        down = g(hp + "mlp.down_proj.weight")
        if fp != f:
            down = torch.cat([down, down.new_zeros(down.shape[0], fp - f)], dim=1)
        out.update({mp + mk: g(hp + hk) for hk, mk, _ in layer_norm_keys(cfg)})
        out.update(
            {
                mp + "self_attention.linear_qkv.weight": _qkv(
                    cfg,
                    g(hp + "self_attn.q_proj.weight"),
                    g(hp + "self_attn.k_proj.weight"),
                    g(hp + "self_attn.v_proj.weight"),
                ),
                mp + "self_attention.linear_proj.weight": _proj(
                    cfg, g(hp + "self_attn.o_proj.weight")
                ),
                mp + "mlp.linear_fc1.weight": torch.cat([_pad_rows(gate, fp), _pad_rows(up, fp)]),
                mp + "mlp.linear_fc2.weight": down,
            }
        )
        if cfg.qkv_bias:
            out[mp + "self_attention.linear_qkv.bias"] = _qkv_bias(
                cfg, *(g(hp + f"self_attn.{x}_proj.bias") for x in "qkv")
            )
        if on_layer is not None:
            on_layer(i)
    out["decoder.final_layernorm.weight"] = g("model.norm.weight")
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = _pad_rows(g("lm_head.weight"), vp)
    return out


def megatron_to_hf(
    cfg: LlamaModelConfig, sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """HF tensors from global Megatron tensors: the exact inverse of `hf_to_megatron`."""
    v, f = cfg.vocab_size, cfg.ffn_hidden_size
    fp = int(cfg.padded_ffn_hidden_size or 0)
    used: set[str] = set()

    def m(name: str) -> torch.Tensor:
        if name not in sd:
            raise MappingError(
                f"the Megatron checkpoint has no tensor {name!r}; does it match its "
                f"{cfg.hf_architecture} config?"
            )
        used.add(name)
        return sd[name]

    out = {"model.embed_tokens.weight": m("embedding.word_embeddings.weight")[:v]}
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}.", megatron_layer_prefix(i)
        q, k, vv = _unqkv(cfg, m(mp + "self_attention.linear_qkv.weight"))
        gate, up = m(mp + "mlp.linear_fc1.weight").split(fp)
        out.update({hp + hk: m(mp + mk) for hk, mk, _ in layer_norm_keys(cfg)})
        out.update(
            {
                hp + "self_attn.q_proj.weight": q,
                hp + "self_attn.k_proj.weight": k,
                hp + "self_attn.v_proj.weight": vv,
                hp + "self_attn.o_proj.weight": _unproj(
                    cfg, m(mp + "self_attention.linear_proj.weight")
                ),
                hp + "mlp.gate_proj.weight": gate[:f],
                hp + "mlp.up_proj.weight": up[:f],
                hp + "mlp.down_proj.weight": m(mp + "mlp.linear_fc2.weight")[:, :f],
            }
        )
        if cfg.qkv_bias:
            qb, kb, vb = _unqkv_bias(cfg, m(mp + "self_attention.linear_qkv.bias"))
            out.update({hp + "self_attn.q_proj.bias": qb, hp + "self_attn.k_proj.bias": kb,
                        hp + "self_attn.v_proj.bias": vb})
    out["model.norm.weight"] = m("decoder.final_layernorm.weight")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = m("output_layer.weight")[:v]
    # Both ways: a tensor the config does not describe (e.g. a config edited to fewer layers)
    # would be dropped from the output without a word, and the model loaded from it broken.
    unused = sorted(k for k in sd if k not in used and not k.endswith("_extra_state")
                    and not (cfg.tie_word_embeddings and k == "output_layer.weight"))
    if unused:
        raise MappingError(
            f"the Megatron checkpoint holds tensors its config ({cfg.num_layers} layers, "
            f"{cfg.hf_architecture}) does not describe: {_short(unused)}; the config and the "
            "tensors do not belong together"
        )
    return {k: t.contiguous() for k, t in out.items()}


def split_kind(name: str) -> str:
    """How a Megatron tensor is split over TP ranks."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                      "linear_qkv.bias")):
        return _ROW
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return _COL
    if name.endswith("linear_fc1.weight"):
        return _GLU
    if name.endswith("norm.weight"):
        return _REPL
    raise MappingError(f"no tensor-parallel split rule for {name!r}")


def shard_for_rank(name: str, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s slice of global tensor `t` at TP=`tp` (a contiguous copy)."""
    kind = split_kind(name)
    if kind == _ROW:
        return t.chunk(tp, dim=0)[rank].clone()
    if kind == _COL:
        return t.chunk(tp, dim=1)[rank].contiguous()
    if kind == _GLU:
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return t.clone()


def merge_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor from every rank's slice (inverse of `shard_for_rank`)."""
    kind = split_kind(name)
    if kind == _ROW:
        return torch.cat(shards, dim=0)
    if kind == _COL:
        return torch.cat(shards, dim=1)
    if kind == _GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    for s in shards[1:]:
        if not torch.equal(s, shards[0]):
            raise MappingError(f"replicated tensor {name!r} differs between ranks")
    return shards[0]
