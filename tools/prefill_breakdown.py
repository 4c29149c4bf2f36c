"""Where one TP rank's eager prefill spends its host time, compression off vs on (one GPU).

    python tools/prefill_breakdown.py --tp 2 --prompt 512 --out DIR

For the model of `bench_prefill.py` (Llama-2-13B shape, stand-in process group), per configuration:
* `wall_ms`: a forward with a device sync before and after (as bench_prefill times it);
* `enqueue_ms`: the same forward until it returns, before the sync (its host time when the GPU
  keeps up; equal to `wall_ms` when the forward is host-bound);
* `row_parallel_us`: host time inside each row-parallel linear's forward (hooks around it),
  median per call: its matmul's launch and its collective;
* a torch.profiler table of CPU self time per op over a few forwards (`profile_<config>.txt`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prefill import SHAPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--codec", default="fp4_e2m1/b32/e6m2")
    ap.add_argument("--pg", default="mirror")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core.tensor_parallel.layers import RowParallelLinear

    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.models.core.builder import build_gpt_model
    from tpcomp_megatron.models.core.config import LlamaModelConfig
    from tpcomp_megatron.models.core.sdpa import use_sdpa
    from tpcomp_megatron.testing.onerank import one_rank_tp

    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    shape = "llama2-13b" if args.tp <= 4 else "llama2-70b"
    _, hidden, ffn, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaModelConfig(num_layers=args.layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                           num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab,
                           max_position_embeddings=args.prompt + 8, tensor_parallel_size=args.tp,
                           params_dtype="bfloat16")
    records = []
    with one_rank_tp(args.tp, backend=args.pg, device=device), torch.no_grad():
        model = build_gpt_model(cfg, layer_spec_transform=use_sdpa).to(device).eval()
        tokens = torch.randint(0, vocab, (1, args.prompt), device=device)
        pos = torch.arange(args.prompt, device=device).unsqueeze(0)

        def forward():
            return model(tokens, pos, attention_mask=None)

        rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
        spans: list[float] = []
        starts: dict = {}

        def pre(mod, inp):
            starts[id(mod)] = time.perf_counter()

        def post(mod, inp, out):
            spans.append((time.perf_counter() - starts[id(mod)]) * 1e6)

        for spec in ["none", args.codec, "none", args.codec]:
            h = apply_tp_compression(model, CompressionConfig(spec=spec, min_bytes=0)) if spec != "none" else None
            for _ in range(3):
                forward()
            torch.cuda.synchronize()
            wall, enq = [], []
            for _ in range(args.reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                forward()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                enq.append((t1 - t0) * 1e3)
                wall.append((t2 - t0) * 1e3)
            hooks = [m.register_forward_pre_hook(pre) for m in rows] + [m.register_forward_hook(post) for m in rows]
            spans.clear()
            for _ in range(args.reps):
                forward()
            torch.cuda.synchronize()
            row_us = statistics.median(spans)
            for k in hooks:
                k.remove()
            rec = {"config": spec, "tp": args.tp, "prompt": args.prompt, "wall_ms": statistics.median(wall),
                   "enqueue_ms": statistics.median(enq), "row_parallel_us": row_us,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__}
            print(json.dumps(rec), flush=True)
            records.append(rec)
            if len(records) > 2:  # the second round: profile
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        forward()
                    torch.cuda.synchronize()
                name = "off" if spec == "none" else "on"
                with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
                    f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
                prof.export_chrome_trace(os.path.join(args.out, f"trace_{name}.json"))
            if h is not None:
                h.remove()
    with open(os.path.join(args.out, "breakdown.jsonl"), "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
