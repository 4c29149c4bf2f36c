"""One TP rank's real prefill on one GPU, compression off vs on: what the compressed path costs.

    python tools/bench_prefill.py --tp 2 8 --out benchmarks/results/prefill_<device>_<date>.jsonl \
        [--links benchmarks/links/h200x2_2026-11-23.json]

A real Megatron `GPTModel` (the project's builder, random bf16 weights, SDPA attention) at TP=N
runs on one device through a stand-in process group (`tpcomp_megatron.testing.onerank`; `--pg
mirror`, the default: each collective is one local kernel giving what ranks holding equal data
would get; `--pg fake`: torch's FakeProcessGroup, whose all-reduce does nothing while its
all-gather and all-to-all launch one copy per peer), so rank 0 does exactly one TP rank's compute
and host work, the whole compressed path included (gate, encode, transport call, decode, stats),
the link excluded. Each
(TP, batch, prompt) times compression off and each codec in the same run: eager forwards in
pairs, off and on back to back (`--reps` x `--rounds` pairs; the overhead is the median of the
pairs' ratios, so a slow spell of a shared machine hits both sides), and (`--graph`, CUDA only)
replays of the whole forward captured in one CUDA graph: the GPU-only floor. Beside each graph record, the GPU time of one
compressed collective alone (`collective_graph_us`) and of its kernels alone (`kernels_graph_us`,
the codec ops it launches, nothing else), both under graph replay: the first over the second is
what the path adds to its kernels (extra copies of the message).

With `--links FILE` (rows of benchmarks/links/*.json) it adds, per link class of that table, the
link time of the exact all-reduces (NCCL bf16) and of the compressed all-gathers to the measured
compute: a modelled TTFT, labelled `modelled: true` (no multi-GPU run is behind it).

On CPU (`--device cpu`, e.g. `--shape tiny`) it runs as a smoke test: eager only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_kernels import _replay_ms  # tools/ is this script's folder (median of event-timed replays)

SHAPES = {
    # name: (layers, hidden, ffn, heads, kv heads, vocab); the layer count is reduced with --layers
    "llama2-13b": (40, 5120, 13824, 40, 40, 32000),
    "llama2-70b": (80, 8192, 28672, 64, 8, 32000),
    "tiny": (2, 256, 512, 4, 2, 512),
}
PAYLOAD_BITS = 4.5  # the link table's compressed all-gather was timed at 4.5 / 16 of the bf16 bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eager(fn, device: torch.device, reps: int) -> float:
    """Median wall ms of `fn()` with a device sync before and after each call."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_graph(fn, reps: int) -> float:
    """Median ms of replays of `fn` captured in one CUDA graph (events around each replay)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    ms = _replay_ms(g, reps)
    del g
    return ms


def load_links(path: str) -> list[dict]:
    with open(path) as f:
        doc = json.load(f)
    return doc["rows"] if isinstance(doc, dict) else doc


def link_ms(rows: list[dict], link: str, world: int, hidden: int, tokens: int, key: str) -> float | None:
    """Link time of one message from the table: the row of this link and world size nearest in
    bytes, scaled linearly in bytes (None without such a row)."""
    cands = [r for r in rows if r["link"] == link and r["world_size"] == world]
    if not cands:
        return None
    nbytes = tokens * hidden * 2
    r = min(cands, key=lambda r: abs(r["bytes"] - nbytes))
    return r[key] * nbytes / r["bytes"]


def kernel_fn(comm, codec, x):
    """A function launching exactly the codec kernels of one compressed all-reduce of `x`."""
    from tpcomp_megatron import ops
    from tpcomp_megatron.codecs.base import REDUCED

    n, hidden = comm.world_size, x.shape[-1]
    rows = x.reshape(-1, hidden)
    if comm.policy.choose_algorithm(n) == "one_shot":
        gathered = torch.stack([ops.encode(codec, rows, source=0)] * n)

        def one_shot():
            ops.encode(codec, rows, source=0)
            ops.decode_sum(codec, gathered, hidden, sources=range(n), dtype=x.dtype)
        return one_shot
    chunk = -(-rows.shape[0] // n)
    received = torch.stack([ops.encode(codec, rows[:chunk], source=0)] * n)
    reduced = torch.stack([ops.encode(codec, rows[:chunk], source=REDUCED)] * n)

    def two_shot():
        ops.encode(codec, rows, source=0)
        ops.decode_sum_encode(codec, received, hidden, sources=range(n), out_source=REDUCED)
        ops.decode_each(codec, reduced, hidden, sources=[REDUCED] * n, dtype=x.dtype)
    return two_shot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=None,
                    help="model shapes (default: llama2-13b at TP=2, llama2-70b at TP=8)")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--layers", type=int, default=10, help="transformer layers built (stated in the records)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--max-tokens", type=int, default=16384, help="skip batch x prompt above this")
    ap.add_argument("--codecs", nargs="+", default=["fp4_e2m1/b32/e6m2"])
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--graph", action="store_true", help="also time the forward as one CUDA graph (CUDA)")
    ap.add_argument("--links", help="link table (benchmarks/links/*.json) for a modelled TTFT")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="", help="free text stored in each record (e.g. which build)")
    ap.add_argument("--pg", choices=["mirror", "fake"], default="mirror",
                    help="the stand-in process group (tpcomp_megatron/testing/onerank.py)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="eager pairs (off, on) per codec: --reps x --rounds")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: cProfile of --reps forwards per configuration (own time, top 30)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.models.core.builder import build_gpt_model
    from tpcomp_megatron.models.core.config import LlamaModelConfig
    from tpcomp_megatron.models.core.sdpa import use_sdpa
    from tpcomp_megatron.testing.onerank import one_rank_tp

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    links = load_links(args.links) if args.links else []
    git = os.environ.get("GIT_COMMIT") or subprocess.run(  # a copied tree's .git may lag: say it
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "git": git,
            "tag": args.tag, "process_group": args.pg}
    shapes = args.shape or ["llama2-13b" if tp <= 4 else "llama2-70b" for tp in args.tp]
    if len(shapes) == 1:
        shapes = shapes * len(args.tp)
    out = open(args.out, "a")
    for tp, shape in zip(args.tp, shapes):
        _, hidden, ffn, heads, kv, vocab = SHAPES[shape]
        cfg = LlamaModelConfig(num_layers=args.layers, hidden_size=hidden, ffn_hidden_size=ffn,
                               num_attention_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                               vocab_size=vocab, max_position_embeddings=max(args.prompts) + 8,
                               tensor_parallel_size=tp, params_dtype="bfloat16" if cuda else "float32")
        with one_rank_tp(tp, backend=args.pg, device=device), torch.no_grad():
            model = build_gpt_model(cfg, layer_spec_transform=use_sdpa, use_cpu_initialization=not cuda)
            model = model.to(device).eval()
            configs = [("none", None)] + [(spec, CompressionConfig(spec=spec, min_bytes=0, algorithm=args.algorithm))
                                          for spec in args.codecs]
            for batch in args.batch:
                for prompt in args.prompts:
                    if batch * prompt > args.max_tokens:
                        continue
                    _run_point(model, configs, apply_tp_compression, cfg, tp, shape, batch, prompt, device, args,
                               links, meta, out)
            del model
            if cuda:
                torch.cuda.empty_cache()
    out.close()


def _run_point(model, configs, apply, cfg, tp, shape, batch, prompt, device, args, links, meta, out) -> None:
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(prompt + batch)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).to(device)
    pos = torch.arange(prompt, device=device).unsqueeze(0).expand(batch, prompt)

    def forward():
        return model(tokens, pos, attention_mask=None)

    if args.profile:
        return _profile(model, configs, apply, forward, args.reps)
    # Each codec is applied once, as a user does (its plans, gate answers and replays are built on
    # the warm-up forwards); then forwards with compression off and on alternate, pair by pair
    # (detached and re-attached layer by layer, `toggle`), so that a slow spell of the machine hits
    # both sides of a pair: the overhead is the median of the pairs' ratios.
    eager, graph, calls, ratios = {spec: [] for spec, _ in configs}, {}, {}, {}
    for spec, c in configs[1:]:
        h = apply(model, c)
        toggle = _toggle(model)
        for on in (False, True):  # warm-up: compiles the kernels, builds plans and replays
            toggle(on)
            h.stats.reset()
            for _ in range(2):
                forward()
        calls[spec] = h.stats.calls_compressed // 2
        ratios[spec] = []
        for i in range(args.reps * args.rounds):
            pair = {}
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                toggle(on)
                pair[on] = time_eager(forward, device, 1)
            eager["none"].append(pair[False])
            eager[spec].append(pair[True])
            ratios[spec].append(pair[True] / pair[False])
        if cuda and args.graph:
            for key, on in (("none", False), (spec, True)):
                toggle(on)
                if key not in graph:
                    try:
                        graph[key] = time_graph(forward, args.reps)
                    except Exception as e:  # noqa: BLE001 (recorded, the eager numbers stand)
                        graph[key] = f"capture failed: {type(e).__name__}: {e}"
        toggle(True)
        h.remove()
    tokens_n = batch * prompt
    collectives = 2 * cfg.num_layers
    base_ms = statistics.median(eager["none"])
    for spec, c in configs:
        ms = statistics.median(eager[spec])
        common = dict(meta, model=f"{shape}-shape", layers=cfg.num_layers, world_size=tp, batch=batch,
                      prompt_tokens=prompt, codec=spec, algorithm="none" if c is None else args.algorithm,
                      collectives=0 if c is None else calls.get(spec, 0))
        recs = [dict(common, mode="eager", ms=ms, baseline_ms=base_ms)]
        if spec in graph:
            recs.append(dict(common, mode="graph", ms=graph[spec], baseline_ms=graph["none"]))
        for rec in recs:
            if isinstance(rec["ms"], str) or isinstance(rec["baseline_ms"], str):
                rec["error"] = rec["ms"] if isinstance(rec["ms"], str) else rec["baseline_ms"]
                rec["ms"] = rec["baseline_ms"] = None
            else:
                paired = rec["mode"] == "eager" and c is not None
                ratio = statistics.median(ratios[spec]) if paired else rec["ms"] / rec["baseline_ms"]
                rec["overhead_pct"] = 100 * (ratio - 1)
                if paired:
                    rec["pairs"] = len(ratios[spec])
                ncoll = rec["collectives"] or collectives
                rec["overhead_us_per_collective"] = 1e3 * (ratio - 1) * rec["baseline_ms"] / ncoll if c else 0.0
            if rec["mode"] == "graph" and c is not None and rec["ms"] is not None:
                rec.update(_collective_graph(c, model, tp, tokens_n, cfg.hidden_size, device, args.reps))
            out.write(json.dumps(rec) + "\n")
            out.flush()
            _print(rec)
            if rec["mode"] == "eager" and links and rec["ms"] is not None:
                for lrec in _modelled(rec, links, tp, cfg.hidden_size, tokens_n, collectives):
                    out.write(json.dumps(lrec) + "\n")
                    _print(lrec)


def _toggle(model):
    """`toggle(on)`: compression attached to, or detached from, every layer `apply_tp_compression`
    gave it (a layer without `tp_compression` runs its Megatron parent's forward, layers.py)."""
    layers = [m for m in model.modules() if getattr(m, "tp_compression", None) is not None]
    attached = [m.tp_compression for m in layers]

    def toggle(on: bool) -> None:
        for m, lc in zip(layers, attached):
            m.tp_compression = lc if on else None
    return toggle


def _profile(model, configs, apply, forward, reps) -> None:
    import cProfile
    import pstats

    for spec, c in configs:
        h = apply(model, c) if c is not None else None
        forward()
        forward()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            forward()
        prof.disable()
        print(f"== {spec}: {reps} forwards")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        if h is not None:
            h.remove()


def _collective_graph(config, model, tp, tokens, hidden, device, reps) -> dict:
    """GPU us of one compressed all-reduce of [tokens, hidden] and of its codec kernels alone."""
    from tpcomp_megatron.comm import CompressedComm, GatePolicy
    from tpcomp_megatron.codecs import make_codec, parse_codec_spec

    comm = CompressedComm(None, GatePolicy(algorithm=config.algorithm, min_bytes=0))
    codec = make_codec(parse_codec_spec(config.spec))
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    try:
        coll = time_graph(lambda: comm.all_reduce(x, codec), reps * 3)
        kern = time_graph(kernel_fn(comm, codec, x), reps * 3)
        fake = time_graph(transport_fn(comm, codec, x), reps * 3)
    except Exception as e:  # noqa: BLE001
        return {"collective_error": f"{type(e).__name__}: {e}"}
    return {"collective_graph_us": coll * 1e3, "kernels_graph_us": kern * 1e3, "fake_transport_graph_us": fake * 1e3}


def transport_fn(comm, codec, x):
    """The process-group calls of one compressed all-reduce of `x` alone, on the payload sizes it
    sends: what the stand-in group itself costs on the GPU (the mirror's one copy per call, the
    fake group's copy per peer): no part of the compressed path; on a real link the link's own
    time replaces it."""
    import torch.distributed as dist

    n, hidden = comm.world_size, x.shape[-1]
    rows = x.reshape(-1, hidden).shape[0]
    if comm.policy.choose_algorithm(n) == "one_shot":
        payload = torch.empty(rows * codec.row_bytes(hidden), dtype=torch.uint8, device=x.device)
        out = torch.empty(n * payload.numel(), dtype=torch.uint8, device=x.device)
        return lambda: dist.all_gather_into_tensor(out, payload)
    chunk = -(-rows // n)
    payload = torch.empty(n * chunk * codec.row_bytes(hidden), dtype=torch.uint8, device=x.device)
    received, gathered = torch.empty_like(payload), torch.empty_like(payload)
    reduced = torch.empty(chunk * codec.row_bytes(hidden), dtype=torch.uint8, device=x.device)

    def two_shot():
        dist.all_to_all_single(received, payload)
        dist.all_gather_into_tensor(gathered, reduced)
    return two_shot


def _modelled(rec: dict, links: list[dict], tp: int, hidden: int, tokens: int, collectives: int) -> list[dict]:
    """Modelled TTFT per link class: measured one-rank compute plus the table's link times."""
    out = []
    for link in sorted({r["link"] for r in links}):
        exact = link_ms(links, link, tp, hidden, tokens, "all_reduce_ms")
        gathered = link_ms(links, link, tp, hidden, tokens, "all_gather_payload_ms")
        if exact is None or gathered is None:
            continue
        base = rec["baseline_ms"] + collectives * exact
        ttft = rec["ms"] + collectives * (gathered if rec["codec"] != "none" else exact)
        out.append(dict(rec, mode="modelled", link=link, modelled=True, modelled_ttft_ms=ttft,
                        modelled_baseline_ttft_ms=base, modelled_speedup=base / ttft))
    return out


def _print(rec: dict) -> None:
    head = f"TP={rec['world_size']} b{rec['batch']} p{rec['prompt_tokens']:5d} {rec['codec']:22s} {rec['mode']:8s}"
    if rec.get("ms") is None:
        print(head, rec.get("error"), flush=True)
    elif rec["mode"] == "modelled":
        print(f"{head} {rec['link']:13s} TTFT {rec['modelled_ttft_ms']:8.2f} ms vs {rec['modelled_baseline_ttft_ms']:8.2f}"
              f" (x{rec['modelled_speedup']:.2f}, modelled)", flush=True)
    else:
        extra = ""
        if "collective_graph_us" in rec:
            extra = (f"  collective {rec['collective_graph_us']:7.1f} us vs kernels {rec['kernels_graph_us']:7.1f} us"
                     f" + stand-in group {rec['fake_transport_graph_us']:5.1f} us")
        print(f"{head} {rec['ms']:8.2f} ms vs {rec['baseline_ms']:8.2f} ({rec['overhead_pct']:+6.1f}%, "
              f"{rec['overhead_us_per_collective']:7.1f} us/coll){extra}", flush=True)


if __name__ == "__main__":
    main()
