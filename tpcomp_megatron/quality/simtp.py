"""Simulated tensor parallelism: the row-parallel partial sums of TP=N formed in one process.

`SimulatedTP(model)` wraps every attention `o_proj` and MLP `down_proj` of a Hugging Face decoder
(Llama, Mistral, Gemma 3 layouts: `model.model.layers[i].self_attn.o_proj` / `.mlp.down_proj`).
Each wrapper is named by its Megatron module (`decoder.layers.{i}.self_attention.linear_proj`,
`decoder.layers.{i}.mlp.linear_fc2`), so calibration files work for simulated and real runs alike.

Inside `with sim.session(tp=N, codecs=...)` a wrapped layer splits its input into the N column
chunks Megatron would give the ranks (`partition.py`, head-aligned, padding replicated), forms each
rank's partial sum `x_r @ W_r^T` in the model's dtype, and reduces them:
* no codecs: exactly, in float32, in rank order;
* codecs: every rank's payload `encode(p_r, source=r)`, reduced by `CompressedComm`'s own
  reduction step (`comm.reduce.reduce_payloads`): one-shot, or two-shot, whose reduced chunk is
  requantized with the `REDUCED` source before it is sent again (an extra rounding);
* with `feedback=True`, each simulated rank keeps an `ErrorFeedback` debt as `CompressedComm`
  does (comm/feedback.py), reset at the start of every forward; on post-norm models (Gemma 2/3)
  each layer pays through the norm its output passes (`PostNorm.probe` of the HF norm).
Outside a session the wrappers call the original linear: the model is the unmodified model.

Why not real ranks: TP=8 on a 2-core CPU would be 8 processes of the whole model; here the cost is
one model plus the codec. The real-rank TP=2 check (`realtp.py`) confirms the partial sums agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..codecs.base import REDUCED, Codec
from ..codecs.point import POINT_ALGORITHMS
from ..comm.feedback import ErrorFeedback, PostNorm
from ..comm.reduce import reduce_payloads
from .partition import RowParallelShapes, rank_columns

ALGORITHMS = POINT_ALGORITHMS
HF_SLOTS = {"linear_proj": ("self_attn", "o_proj", "self_attention"), "linear_fc2": ("mlp", "down_proj", "mlp")}

Observer = Callable[[str, torch.Tensor], None]
"""Called with (layer name, partial sums [tp, rows, hidden]) on every simulated forward."""


def megatron_name(layer: int, kind: str) -> str:
    return f"decoder.layers.{layer}.{HF_SLOTS[kind][2]}.{kind}"


def exact_sum(partials: torch.Tensor) -> torch.Tensor:
    """float32 sum over ranks in rank order, starting from +0.0 (as the decoders add)."""
    acc = torch.zeros(partials.shape[1:], dtype=torch.float32, device=partials.device)
    for p in partials:
        acc = acc + p.float()
    return acc


def simulated_all_reduce(codec: Codec | None, partials: torch.Tensor, *, algorithm: str = "one_shot",
                         dtype: torch.dtype | None = None, feedback: Sequence[ErrorFeedback] | None = None,
                         norm: PostNorm | None = None) -> torch.Tensor:
    """What every rank receives from the compressed all-reduce of `partials` [tp, rows, hidden]
    (`codec` None: the exact sum). With `feedback` (one state per rank), each rank sends its
    partial sum plus its debt and settles the debt, as `CompressedComm.all_reduce` does (`norm`:
    the post-norm the output passes before the residual add)."""
    n, rows, hidden = partials.shape
    dtype = dtype or partials.dtype
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; valid: {list(ALGORITHMS)}")
    if codec is not None:
        why = codec.ineligible(hidden)
        if why:  # the real gate would silently send these exactly; a quality sweep must not
            raise ValueError(f"codec {codec.spec} cannot encode rows of {hidden} values: {why}")
    sends = partials if feedback is None else torch.stack([fb.to_send(p, norm) for fb, p in zip(feedback, partials)])
    own = None  # with feedback: what each rank's contribution decodes to, float32
    if codec is None:  # an exact reduction pays every debt (but for the rounding to the model's dtype)
        exact_in = sends.to(partials.dtype)
        out = exact_sum(exact_in).to(dtype)
        if feedback is not None:
            own = exact_in.float()
    else:
        payloads = torch.stack([codec.encode(x, source=r) for r, x in enumerate(sends)])
        if feedback is not None:
            own = torch.stack([codec.decode_f32(p, hidden, source=r) for r, p in enumerate(payloads)])
        # CompressedComm's reduction step itself (comm/reduce.py). Rows are coded independently,
        # so reducing all rows at once equals each rank reducing its chunk; with feedback rank r
        # owns rows chunk r (padded as CompressedComm pads) and that chunk's requantization error.
        result, error = reduce_payloads(codec, payloads, hidden, algorithm=algorithm, dtype=dtype,
                                        with_error=algorithm == "two_shot")
        if algorithm == "one_shot":
            out = result
        else:
            out = codec.decode(result, hidden, source=REDUCED, dtype=dtype)
            if feedback is not None and norm is not None:  # through the norm with the rest
                chunk = -(-rows // n)
                for r in range(n):
                    own[r, r * chunk:(r + 1) * chunk] += error[r * chunk:(r + 1) * chunk]
    if feedback is not None:
        for fb, x, c in zip(feedback, sends, own):
            fb.settle(x, c, out)
        if codec is not None and algorithm == "two_shot" and norm is None:
            # CompressedComm's order: the fused encode settles, then the requantization error
            # of a rank's chunk comes off its debt
            chunk = -(-rows // n)
            for r, fb in enumerate(feedback):
                fb.debt[r * chunk:(r + 1) * chunk] -= error[r * chunk:(r + 1) * chunk]
    return out


@dataclass
class _Session:
    tp: int = 1
    active: bool = False
    codecs: Mapping[str, Codec | None] | None = None
    algorithm: str = "one_shot"
    observer: Observer | None = None
    feedback: list[ErrorFeedback] | None = None
    norms: Mapping[str, PostNorm] | None = None  # with feedback on a post-norm model


class SimulatedRowParallel(torch.nn.Module):
    """A row-parallel linear (`nn.Linear`) computed as TP partial sums plus a (compressed) reduction."""

    def __init__(self, linear: torch.nn.Linear, *, name: str, kind: str, shapes: RowParallelShapes, state: _Session):
        super().__init__()
        self.linear = linear
        self.name = name
        self.kind = kind
        self.shapes = shapes
        self._state = state
        self._split: tuple[int, list[slice | torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def hidden(self) -> int:
        return self.linear.out_features

    def _rank_split(self, tp: int):
        """(column selector, weight slice) per rank for `tp`; one TP size is cached at a time."""
        if self._split is None or self._split[0] != tp:
            sels, weights = [], []
            w = self.linear.weight.detach()
            for cols in rank_columns(self.kind, self.shapes, tp):
                contiguous = cols.numel() > 0 and bool((cols.diff() == 1).all())
                sel = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
                sels.append(sel)
                weights.append((w[:, sel] if contiguous else w.index_select(1, cols)).contiguous())
            self._split = (tp, sels, weights)
        return self._split[1], self._split[2]

    def partial_sums(self, rows: torch.Tensor, tp: int) -> torch.Tensor:
        """`[rows, in]` -> `[tp, rows, hidden]`: what each rank's local matmul produces."""
        sels, weights = self._rank_split(tp)
        out = rows.new_zeros((tp, rows.shape[0], self.hidden))
        for r, (sel, w) in enumerate(zip(sels, weights)):
            if w.shape[1]:  # a rank holding only padding heads contributes exact zeros
                x = rows[:, sel] if isinstance(sel, slice) else rows.index_select(1, sel)
                out[r] = F.linear(x, w)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state
        if not st.active:
            return self.linear(x)
        rows = x.reshape(-1, x.shape[-1])
        partials = self.partial_sums(rows, st.tp)
        if st.observer is not None:
            st.observer(self.name, partials)
        codec = None if st.codecs is None or st.tp == 1 else st.codecs[self.name]
        # A layer mapped to None stays exact (per-layer mixed configurations).
        norm = None if st.norms is None else st.norms[self.name]
        out = simulated_all_reduce(codec, partials, algorithm=st.algorithm, dtype=x.dtype,
                                   feedback=st.feedback, norm=norm)
        if self.linear.bias is not None:  # Megatron adds the bias after the reduction
            out = out + self.linear.bias
        return out.reshape(*x.shape[:-1], self.hidden)


def _decoder_layers(model: torch.nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `model.layers` list of decoder layers; "
                         "simulated TP supports Hugging Face Llama/Mistral/Gemma-style causal LMs")
    return layers


POST_NORMS = {"linear_proj": "post_attention_layernorm", "linear_fc2": "post_feedforward_layernorm"}
"""The norm each row-parallel output passes in a post-normed HF layer (Gemma 2/3)."""


def _post_normed(layer: torch.nn.Module) -> bool:
    """Whether the layer normalizes its attention and MLP outputs before the residual adds (Gemma
    2/3). A Llama layer's `post_attention_layernorm` is its pre-MLP norm: only a layer that also
    has a `post_feedforward_layernorm` is post-normed."""
    return getattr(layer, "post_feedforward_layernorm", None) is not None


class SimulatedTP:
    """Simulated-TP wrappers on a Hugging Face model; `remove()` puts the original linears back."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.shapes = RowParallelShapes.from_hf_config(model.config)
        self._state = _Session()
        self.layers: dict[str, SimulatedRowParallel] = {}
        self._post_norms: dict[str, torch.nn.Module] = {}  # layer name -> the norm its output passes
        self._undo: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        for i, layer in enumerate(_decoder_layers(model)):
            post_normed = _post_normed(layer)
            for kind, (parent_attr, attr, _) in HF_SLOTS.items():
                parent = getattr(layer, parent_attr, None)
                linear = getattr(parent, attr, None)
                if not isinstance(linear, torch.nn.Linear):
                    raise ValueError(f"layer {i} has no nn.Linear {parent_attr}.{attr} (got {type(linear).__name__})")
                wrapper = SimulatedRowParallel(linear, name=megatron_name(i, kind), kind=kind,
                                               shapes=self.shapes, state=self._state)
                self._check_width(wrapper)
                setattr(parent, attr, wrapper)
                self._undo.append((parent, attr, linear))
                self.layers[wrapper.name] = wrapper
                if post_normed:
                    self._post_norms[wrapper.name] = getattr(layer, POST_NORMS[kind])
        self.hidden = next(iter(self.layers.values())).hidden

    def _check_width(self, w: SimulatedRowParallel) -> None:
        s = self.shapes
        want = s.num_heads * s.head_dim if w.kind == "linear_proj" else s.ffn_hidden_size
        if w.linear.in_features != want:
            raise ValueError(f"{w.name}: input width {w.linear.in_features} does not match the config ({want})")

    @contextlib.contextmanager
    def session(self, *, tp: int, codecs: Mapping[str, Codec | None] | None = None, algorithm: str = "one_shot",
                observer: Observer | None = None, feedback: bool = False) -> Iterator[SimulatedTP]:
        """Forwards inside run at TP=`tp`; `codecs` maps every layer name to its codec, or to None
        for an exact reduction (all exact when `codecs` is None); `feedback`: error feedback."""
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive integer, got {tp!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; valid: {list(ALGORITHMS)}")
        if codecs is not None:
            missing = sorted(set(self.layers) - set(codecs))
            if missing:
                raise ValueError(f"codecs missing for {len(missing)} layers, e.g. {missing[0]}")
        if self._state.active:
            raise RuntimeError("a simulated-TP session is already active on this model")
        st = self._state
        st.tp, st.codecs, st.algorithm, st.observer = tp, codecs, algorithm, observer
        st.feedback = [ErrorFeedback(tp) for _ in range(tp)] if feedback and codecs is not None else None
        if st.feedback is not None and self._post_norms:
            st.norms = {name: PostNorm.probe(norm, self.hidden) for name, norm in self._post_norms.items()}
        hook = None
        if st.feedback is not None:  # a debt belongs to one forward's rows
            def reset(module, args) -> None:  # returns None: a pre-hook's result would replace the args
                for fb in st.feedback:
                    fb.reset()

            hook = self.model.register_forward_pre_hook(reset)
        st.active = True
        try:
            yield self
        finally:
            st.active, st.codecs, st.observer, st.feedback, st.norms = False, None, None, None, None
            if hook is not None:
                hook.remove()

    def remove(self) -> None:
        for parent, attr, linear in reversed(self._undo):
            setattr(parent, attr, linear)
        self._undo.clear()
        self.layers.clear()
