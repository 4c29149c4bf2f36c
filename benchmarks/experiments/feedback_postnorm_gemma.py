"""EXPERIMENT (not library code): error feedback through post-norms (Gemma 2/3), simulated TP.

    python benchmarks/experiments/feedback_postnorm_gemma.py gemma3-270m 8 2 \
        debt_off:fp4_e2m1/b32/e6m2,debt_ratio:fp4_e2m1/b32/e6m2,debt_own:fp4_e2m1/b32/e6m2,debt_oracle:fp4_e2m1/b32/e6m2

Each rank keeps its debt in residual-stream units: after reduction j (post-norm gain gamma_j) it
owes `-(gamma_j / rms(S_j)) * (c_r - p_r)` (first order, the norm's projection included with
PROJ=1); before reduction j+1 it sends `p_r + debt * K / gamma_{j+1}`, clamped so no value exceeds
its block's maximum (CLAMP=1), with K, the unknown rms of the next output, estimated as
`debt_ratio`: the previous output's rms times a calibrated per-layer ratio; `debt_own`:
sqrt(tp) x the rank's own partial-sum rms; `debt_oracle`: the true rms (not deployable).
`debt_off` is no feedback. CLAMP_FRACTION=f instead limits each send to f x its block's maximum. Results: benchmarks/results/quality_cpu-amd-epyc_2026-11-23.md
(every variant made Gemma 3 270M worse, so the library refuses feedback on post-norm models).
Modes `naive` / `static` / `oracle` scale the raw error instead of a residual-unit debt.
"""
import sys, os, torch
from tpcomp_megatron.quality import simtp
from tpcomp_megatron.quality.models import load_model
from tpcomp_megatron.quality.text import make_windows
from tpcomp_megatron.quality.simtp import SimulatedTP, exact_sum
from tpcomp_megatron.quality.sweep import compare, Plan
from tpcomp_megatron.codecs import make_codec, parse_codec_spec

torch.set_num_threads(2)
CLAMP = os.environ.get('CLAMP', '1') == '1'
PROJ = os.environ.get('PROJ', '1') == '1'
CLAMP_FRACTION = float(os.environ['CLAMP_FRACTION']) if os.environ.get('CLAMP_FRACTION') else None
model_name, tp, nwin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
modes = sys.argv[4].split(",")
model, tok, mid = load_model(model_name)
sim = SimulatedTP(model)
names = list(sim.layers)
Hn = sim.hidden
win = make_windows(tok, "moby-dick", seq_len=512, windows=nwin)
cal = make_windows(tok, "sotu-1901", seq_len=512, windows=1)
post = model.model.layers[0].__dict__.get("_modules", {}).get("post_attention_layernorm") is not None
gam = []
for L in model.model.layers:
    if post:
        gam += [1 + L.post_attention_layernorm.weight.detach().float(), 1 + L.post_feedforward_layernorm.weight.detach().float()]
    else:
        gam += [torch.ones(sim.hidden), torch.ones(sim.hidden)]
# calibrate rms ratios
rms = {n: [] for n in names}
def obs(name, p): rms[name].append(exact_sum(p).pow(2).mean(-1).sqrt())
with torch.no_grad(), sim.session(tp=tp, observer=obs):
    model(cal.inputs[0:1])
ratio = []
for j in range(len(names) - 1):
    a, b = torch.cat(rms[names[j]]), torch.cat(rms[names[j + 1]])
    lr = (b / a).log()
    ratio.append(lr.mean().exp().item())
    if j < 6 or j > len(names) - 4:
        print(f"{names[j]} -> next: rms ratio gmean {ratio[-1]:.3f}, log-std {lr.std().item():.3f}")

class FB:
    def __init__(self, inner, idx, mode, state):
        self.inner, self.idx, self.mode, self.st = inner, idx, mode, state
    def __getattr__(self, k): return getattr(self.inner, k)

orig = simtp.simulated_all_reduce
def patched(codec, partials, *, algorithm="one_shot", dtype=None, **kw):
    if not isinstance(codec, FB):
        return orig(codec, partials, algorithm=algorithm, dtype=dtype)
    st, j, n, H = codec.st, codec.idx, partials.shape[0], partials.shape[-1]
    x = partials.float()
    if j == 0: st["carry"] = None; st["a"] = None; st["rms_prev"] = None
    if codec.mode.startswith("debt"):
        a = st.get("a")
        p = partials.float()
        if a is None or codec.mode == "debt_off":
            x = p
        else:
            if post:
                if codec.mode == "debt_own":
                    K = p.pow(2).mean(-1, keepdim=True).sqrt() * n ** 0.5
                elif codec.mode == "debt_oracle":
                    K = exact_sum(partials).pow(2).mean(-1, keepdim=True).sqrt()
                else:
                    K = st["rms_prev"] * (ratio[j - 1] if codec.mode == "debt_ratio" else 1.0)
                g = gam[j]
                ok = g.abs() > 1e-3 * g.abs().median()
                send = torch.where(ok, a * K / torch.where(ok, g, torch.ones_like(g)), torch.zeros_like(a))
                R, Hh = p.shape[1], p.shape[2]
                M = p.abs().view(n, R, Hh // 32, 32).amax(-1, keepdim=True).expand(n, R, Hh // 32, 32).reshape(n, R, Hh)
                if CLAMP_FRACTION is None:  # |x| never exceeds the block maximum
                    x = torch.maximum(torch.minimum(p + send, M), -M)
                else:  # each send at most CLAMP_FRACTION of its block's maximum
                    x = p + torch.maximum(torch.minimum(send, M * CLAMP_FRACTION), -M * CLAMP_FRACTION)
            else:
                x = p + a
        inner = codec.inner
        pay = torch.stack([inner.encode(x[r].to(partials.dtype), source=r) for r in range(n)])
        deq = torch.stack([inner.decode_f32(pay[r], H, source=r) for r in range(n)])
        out = inner.decode_sum_f32(pay, H, range(n))
        rs = out.pow(2).mean(-1, keepdim=True).sqrt()
        scale = gam[j] / rs if post else 1.0
        d = deq - p
        if post and PROJ:
            d = d - out * ((out * d).sum(-1, keepdim=True) / (Hn * rs ** 2))
        st["a"] = (a if a is not None and codec.mode != "debt_off" else 0) - scale * d
        st["rms_prev"] = rs
        return out.to(dtype or partials.dtype)
    if st.get("carry") is not None and codec.mode != "off":
        c = st["carry"]
        if post and codec.mode != "naive":
            f = gam[j - 1] / gam[j]
            if codec.mode == "oracle":
                r = exact_sum(partials).pow(2).mean(-1, keepdim=True).sqrt() / st["rms_prev"]
            else:
                r = ratio[j - 1]
            c = c * f * r
        x = x + c
    inner = codec.inner
    pay = torch.stack([inner.encode(x[r].to(partials.dtype), source=r) for r in range(n)])
    deq = torch.stack([inner.decode_f32(pay[r], H, source=r) for r in range(n)])
    st["carry"] = x - deq
    out = inner.decode_sum_f32(pay, H, range(n))
    st["rms_prev"] = out.pow(2).mean(-1, keepdim=True).sqrt()
    return out.to(dtype or partials.dtype)
simtp.simulated_all_reduce = patched

plans, labels = [], []
for item in modes:
    mode, _, rest = item.partition(":")
    spec, _, ov = rest.partition("@")
    ovs = {}
    for kv in filter(None, ov.split("|")):
        idx, _, s2 = kv.partition("=")
        ovs[int(idx)] = make_codec(parse_codec_spec(s2))
    base_c = make_codec(parse_codec_spec(spec))
    st = {}
    plans.append(Plan(tp, {n: FB(ovs.get(i, base_c), i, mode, st) for i, n in enumerate(names)})); labels.append(item)
base, totals, secs = compare(model, sim, win, plans, labels=labels, log=lambda s: print(s, flush=True))
for l, t in zip(labels, totals):
    print(f"{l}: ppl {t.ppl:.3f} ({100*(t.ppl/base.ppl-1):+.2f}%) KL {t.mean_kl:.4f} top1 {t.top1_agreement:.4f}", flush=True)
