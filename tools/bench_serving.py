"""A serving trace on one GPU: one TP rank at real depth, a new prompt length per request, then
decode steps; compression off and on interleaved request by request.

    python tools/bench_serving.py --out benchmarks/results/serving_<device>_<date>.jsonl \
        [--md benchmarks/results/serving_<device>_<date>.md] [--requests 200] [--models 13b 70b]

One TP rank of a real Megatron `GPTModel` (the project's builder, random bf16 weights, SDPA
attention) runs through the mirror stand-in process group (`tpcomp_megatron.testing.onerank`:
each collective is one local kernel giving what ranks holding equal data would get; the link is
excluded, all of one rank's compute and host work is real): Llama-2-13B's shape, 40 layers, at
TP=2, and Llama-2-70B's (hidden 8192, 64 heads, 8 KV heads, FFN 28672), 80 layers, at TP=8.

Prefill. `--requests` prompt lengths, all distinct, drawn with a fixed seed from a log-normal
(`--mu`, `--sigma`, in tokens) clipped to 32-8192. Per request: one untimed forward with
compression off (the torch side's first sight of the shape: allocator, attention kernels), then a
pair off / on (the order alternating request by request; the compressed path sees the length for
the first time: its gate answer, and a kit where the row bucket is new), then a second pair on the
same length (repeated length). Every prefill collective is compressed (`min_bytes=0`: the most
host work the compressed path can add). Before the trace, as a server's start-up does, a few
untimed forwards at lengths outside it compile the kernels, and `capture_graphs` captures the
CUDA graphs of every graph row count up to the longest prompt (`comm/graphs.py`; their number
and the seconds it took are recorded). The overhead of a request is its pair's
on/off ratio minus one (wall time, the host-bound TTFT; and GPU time from CUDA events around the
same forward); p50 and p90 over the requests.

Decode. Steps of one new token for each of `batch` sequences (batch 1, 8, 32, 64), with the gate
deciding as deployed (`--link`, seed thresholds, no probe): small messages go exact. A step here
is the model's forward on [batch, 1] tokens without a KV cache: all of a decode step's linear
layers and collectives, not its attention over the context (a smaller denominator: the overhead
is overstated, never hidden). Pairs off / on, order alternating; p50 and p90 of the ratios.

The records (`serving_*.jsonl`, form in shared/RESULTS.md) carry the device, date, commit and
command; `--md` writes the page of one or more runs (`--tag` tells builds apart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import torch
from bench_prefill import SHAPES, _toggle  # tools/ is this script's folder

MODELS = {"13b": ("llama2-13b", 2, 40), "70b": ("llama2-70b", 8, 80)}
WARMUP_LENGTHS = (33, 48, 100, 127, 250, 256, 700, 1000, 1543, 3000, 4096, 8192)
"""Untimed start-up lengths (kept out of the trace): residues mod 16 and the row buckets' kernels."""


def trace_lengths(n: int, seed: int, mu: float, sigma: float, lo: int = 32, hi: int = 8192) -> list[int]:
    """n distinct prompt lengths from a log-normal(mu, sigma) (of the token count) clipped to
    [lo, hi], none of the warm-up lengths, in the order drawn."""
    rng = random.Random(seed)
    seen: set[int] = set(WARMUP_LENGTHS)
    out: list[int] = []
    while len(out) < n:
        v = min(hi, max(lo, int(round(rng.lognormvariate(mu, sigma)))))
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def timed(fn, cuda: bool) -> tuple[float, float]:
    """(wall ms, GPU ms) of `fn()`, synchronized before and after."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3, start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms


def pair(forward, toggle, order_on_first: bool, cuda: bool) -> dict:
    """One off / on pair (order as given): {False: (wall, gpu), True: (wall, gpu)}."""
    got = {}
    for on in ((True, False) if order_on_first else (False, True)):
        toggle(on)
        got[on] = timed(forward, cuda)
    toggle(True)
    return got


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def overheads(pairs: list[dict], which: int) -> list[float]:
    return [100 * (p[True][which] / p[False][which] - 1) for p in pairs]


def comm_state(comm) -> tuple[int | None, int | None]:
    """(set-up states built, kept payload bytes) of a communicator, in this build or an earlier one
    (where the collectives were 'replays': one per exact call, kept bytes counted alike)."""
    kits = getattr(comm, "kits", None)
    if kits is not None:
        return kits.built, kits.kept_bytes
    replays = getattr(comm, "_replays", None)
    if replays is not None:
        return len(replays._runs), replays._kept
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["13b", "70b"])
    ap.add_argument("--layers", type=int, default=None, help="override the depth (default: the model's)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--mu", type=float, default=math.log(768), help="log-normal mu of the prompt length")
    ap.add_argument("--sigma", type=float, default=1.1, help="log-normal sigma of the prompt length")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--codec", default="fp4_e2m1/b32/e6m2")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=40, help="decode pairs per batch")
    ap.add_argument("--link", default="pcie_class", help="the gate's link class for decode steps")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="override the model shape (e.g. tiny)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                    help="CompressionConfig.cuda_graphs: collectives replayed from CUDA graphs (comm/graphs.py)")
    ap.add_argument("--tag", default="", help="free text stored in each record (e.g. which build)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after each model's trace, write torch.profiler traces (Chrome JSON) of one forward off "
                         "and on at the trace's median length into DIR: where the overhead goes")
    ap.add_argument("--md", help="also write the Markdown page of --out (every record in it)")
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
    git = os.environ.get("GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "git": git,
            "tag": args.tag, "process_group": "mirror"}
    lengths = [min(n, args.max_tokens) for n in trace_lengths(args.requests, args.seed, args.mu, args.sigma,
                                                              hi=args.max_tokens)]
    dist_text = (f"lognormal(mu=ln {math.exp(args.mu):.0f}, sigma={args.sigma}) clipped 32-{args.max_tokens}, "
                 f"distinct, seed {args.seed}")
    print(f"trace: {len(lengths)} prompt lengths, median {statistics.median(lengths):.0f}, "
          f"p90 {pct(lengths, 0.9)}, max {max(lengths)} ({dist_text})", flush=True)
    out = open(args.out, "a")
    for key in args.models:
        shape, tp, layers = MODELS[key]
        shape = args.shape or shape
        _, hidden, ffn, heads, kv, vocab = SHAPES[shape]
        layers = args.layers or layers
        cfg = LlamaModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                               num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab,
                               max_position_embeddings=args.max_tokens + 8, tensor_parallel_size=tp,
                               params_dtype="bfloat16" if cuda else "float32")
        common = dict(meta, model=f"{shape}-shape", layers=layers, world_size=tp, codec=args.codec,
                      cuda_graphs=args.cuda_graphs)
        with one_rank_tp(tp, backend="mirror", device=device), torch.no_grad():
            model = build_gpt_model(cfg, layer_spec_transform=use_sdpa, use_cpu_initialization=not cuda)
            model = model.to(device).eval()
            gen = torch.Generator().manual_seed(args.seed)

            def forward_of(batch: int, length: int, start: int = 0):
                tokens = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
                pos = torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, length)
                return lambda: model(tokens, pos, attention_mask=None)

            graphs = args.cuda_graphs == "on"
            rec = _prefill(model, apply_tp_compression,
                           CompressionConfig(spec=args.codec, min_bytes=0, cuda_graphs=graphs), lengths,
                           forward_of, cuda, layers, args)
            rec.update(common, phase="prefill", requests=len(lengths), length_distribution=dist_text)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            _print(rec)
            decode_cfg = CompressionConfig(spec=args.codec, link=args.link, gate_table="seed", gate_probe=False,
                                           cuda_graphs=graphs)
            for batch in args.batches:
                rec = _decode(model, apply_tp_compression, decode_cfg, batch, forward_of, cuda, layers, args)
                rec.update(common, phase="decode", link=args.link)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                _print(rec)
            del model
            if cuda:
                torch.cuda.empty_cache()
    out.close()
    if args.md:
        write_page(args.out, args.md)


def _prefill(model, apply, config, lengths, forward_of, cuda, layers, args) -> dict:
    handle = apply(model, config)
    toggle = _toggle(model)
    for n in WARMUP_LENGTHS:  # start-up: kernels compiled, the torch side warmed
        if n <= args.max_tokens:
            forward = forward_of(1, n)
            for on in (False, True):
                toggle(on)
                forward()
    toggle(True)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    captured0 = handle.capture_graphs(max(lengths))  # start-up: every graph row count of the trace's range
    if cuda:
        torch.cuda.synchronize()
    capture_s = time.perf_counter() - t0
    built0, _ = comm_state(handle.comm)
    first, repeat, bad = [], [], 0
    t0 = time.perf_counter()
    for i, n in enumerate(lengths):
        forward = forward_of(1, n)
        toggle(False)
        forward()  # the torch side's first sight of this shape, untimed
        handle.stats.reset()
        first.append(pair(forward, toggle, i % 2 == 1, cuda))
        if handle.stats.calls_compressed != 2 * layers or handle.stats.calls_fallback:
            bad += 1
        repeat.append(pair(forward, toggle, i % 2 == 0, cuda))
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(lengths)} requests, {time.perf_counter() - t0:.0f} s", flush=True)
    built, kept = comm_state(handle.comm)
    graphs = getattr(handle.comm, "graphs", None)
    if args.profile:
        _profile(forward_of(1, int(statistics.median(lengths))), toggle, args.profile, f"{layers}x")
    handle.remove()
    wall_first, gpu_first = overheads(first, 0), overheads(first, 1)
    wall_rep, gpu_rep = overheads(repeat, 0), overheads(repeat, 1)
    p50_first, p50_rep = statistics.median(wall_first), statistics.median(wall_rep)
    return {"overhead_pct_p50": p50_first, "overhead_pct_p90": pct(wall_first, 0.9),
            "first_request_overhead_pct": p50_first, "repeat_overhead_pct_p50": p50_rep,
            "repeat_overhead_pct_p90": pct(wall_rep, 0.9),
            "first_over_repeat": p50_first / p50_rep if p50_rep > 0 else None,
            "gpu_overhead_pct_p50": statistics.median(gpu_first), "gpu_overhead_pct_p90": pct(gpu_first, 0.9),
            "gpu_repeat_overhead_pct_p50": statistics.median(gpu_rep),
            "baseline_ms_p50": statistics.median(p[False][0] for p in first),
            "baseline_gpu_ms_p50": statistics.median(p[False][1] for p in first),
            "by_length": _by_length(lengths, wall_first),
            "kept_payload_bytes": kept, "plans_built": built, "plans_built_in_trace": None if built is None else built - built0,
            "requests_not_all_compressed": bad, "collectives_per_request": 2 * layers,
            "graphs_captured_at_start_up": captured0, "start_up_capture_s": capture_s,
            "graphs_captured": None if graphs is None else graphs.captured,
            "graphs_replayed": None if graphs is None else graphs.replays,
            "graph_bytes_kept": None if graphs is None else graphs.nbytes}


def _by_length(lengths: list[int], overhead: list[float]) -> dict:
    """Median overhead per length band (where the overhead comes from)."""
    bands = ((32, 256), (257, 1024), (1025, 4096), (4097, 8192))
    out = {}
    for lo, hi in bands:
        vals = [o for n, o in zip(lengths, overhead) if lo <= n <= hi]
        if vals:
            out[f"{lo}-{hi}"] = {"requests": len(vals), "overhead_pct_p50": statistics.median(vals)}
    return out


def _decode(model, apply, config, batch, forward_of, cuda, layers, args) -> dict:
    handle = apply(model, config)
    toggle = _toggle(model)
    forward = forward_of(batch, 1, start=1000)
    for on in (False, True, False, True):
        toggle(on)
        forward()
    handle.stats.reset()
    pairs = [pair(forward, toggle, i % 2 == 1, cuda) for i in range(args.steps)]
    steps = args.steps
    compressed, exact = handle.stats.calls_compressed // steps, handle.stats.calls_fallback // steps
    handle.remove()
    wall, gpu = overheads(pairs, 0), overheads(pairs, 1)
    return {"batch": batch, "steps": steps, "overhead_pct_p50": statistics.median(wall),
            "overhead_pct_p90": pct(wall, 0.9), "gpu_overhead_pct_p50": statistics.median(gpu),
            "gpu_overhead_pct_p90": pct(gpu, 0.9), "baseline_ms_p50": statistics.median(p[False][0] for p in pairs),
            "compressed_per_step": compressed, "exact_per_step": exact}


def _profile(forward, toggle, folder: str, name: str) -> None:
    """torch.profiler traces of `forward` with compression off and on (after a warm call each)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for on in (False, True):
        toggle(on)
        forward()
        with profile(activities=activities) as prof:
            forward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(folder, f"serving_{name}_{'on' if on else 'off'}.json"))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    toggle(True)


def _print(rec: dict) -> None:
    head = f"{rec['model']} x{rec['layers']} TP={rec['world_size']} {rec['tag']:6s} {rec['phase']:7s}"
    if rec["phase"] == "prefill":
        print(f"{head} {rec['requests']} requests: TTFT overhead p50 {rec['overhead_pct_p50']:+.1f}% "
              f"p90 {rec['overhead_pct_p90']:+.1f}% (GPU {rec['gpu_overhead_pct_p50']:+.1f}%); repeated length p50 "
              f"{rec['repeat_overhead_pct_p50']:+.1f}%; baseline p50 {rec['baseline_ms_p50']:.1f} ms; set-ups built "
              f"{rec['plans_built']}, kept {rec['kept_payload_bytes']} B; graphs captured {rec.get('graphs_captured')} "
              f"({rec.get('graphs_captured_at_start_up')} at start-up, {rec.get('start_up_capture_s', 0):.1f} s), "
              f"replayed {rec.get('graphs_replayed')}, kept {rec.get('graph_bytes_kept')} B", flush=True)
    else:
        print(f"{head} batch {rec['batch']:3d}: overhead p50 {rec['overhead_pct_p50']:+.1f}% p90 "
              f"{rec['overhead_pct_p90']:+.1f}% (GPU {rec['gpu_overhead_pct_p50']:+.1f}%), baseline "
              f"{rec['baseline_ms_p50']:.2f} ms; per step {rec['compressed_per_step']} compressed, "
              f"{rec['exact_per_step']} exact", flush=True)


def _graph_cell(r: dict) -> str:
    if r.get("graphs_captured") is None:
        return "off"
    start = r.get("graphs_captured_at_start_up")
    at = "" if start is None else f" ({start}, {r.get('start_up_capture_s', 0):.1f} s)"
    return f"{r['graphs_captured']}{at} / {r.get('graphs_replayed')}"


def write_page(jsonl: str, md: str) -> None:
    """The Markdown page of the serving records in `jsonl`."""
    recs = [json.loads(line) for line in open(jsonl) if line.strip()]
    if not recs:
        return
    r0 = recs[0]
    lines = [f"# Serving trace on one GPU ({r0['device']}, {r0['date']})", "",
             "One TP rank through the mirror stand-in group (tools/bench_serving.py: the link excluded, all of "
             "one rank's compute and host work real). Overheads are paired on/off ratios, median (p50) and 90th "
             "percentile over the requests or steps; wall time is the host-bound TTFT, GPU time from CUDA events "
             "around the same forward.", "",
             f"Commands: {sorted({r['command'] for r in recs})}", "",
             "## Prefill (every collective compressed)", "",
             "| build (commit) | model | layers | TP | requests | overhead p50 | p90 | first-seen / repeated length p50 "
             "| GPU p50 | baseline TTFT p50 | set-ups built | kept payload bytes | graphs captured (at start-up, s) / "
             "replayed | graph buffers kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r["phase"] != "prefill":
            continue
        lines.append(f"| {r['tag']} ({r['git']}) | {r['model']} | {r['layers']} | {r['world_size']} | {r['requests']} | "
                     f"{r['overhead_pct_p50']:+.1f}% | {r['overhead_pct_p90']:+.1f}% | "
                     f"{r['first_request_overhead_pct']:+.1f}% / {r['repeat_overhead_pct_p50']:+.1f}% | "
                     f"{r['gpu_overhead_pct_p50']:+.1f}% | {r['baseline_ms_p50']:.1f} ms | {r['plans_built']} | "
                     f"{r['kept_payload_bytes']} | {_graph_cell(r)} | {r.get('graph_bytes_kept')} |")
    lines += ["", "Prompt lengths: " + "; ".join(sorted({r["length_distribution"] for r in recs if "length_distribution" in r})),
              "", "## Decode steps (the gate decides; seed thresholds)", "",
              "| build (commit) | model | TP | link | batch | steps | overhead p50 | p90 | GPU p50 | baseline step "
              "| compressed / exact per step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r["phase"] != "decode":
            continue
        lines.append(f"| {r['tag']} ({r['git']}) | {r['model']} | {r['world_size']} | {r['link']} | {r['batch']} | "
                     f"{r['steps']} | {r['overhead_pct_p50']:+.1f}% | {r['overhead_pct_p90']:+.1f}% | "
                     f"{r['gpu_overhead_pct_p50']:+.1f}% | {r['baseline_ms_p50']:.2f} ms | "
                     f"{r['compressed_per_step']} / {r['exact_per_step']} |")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
