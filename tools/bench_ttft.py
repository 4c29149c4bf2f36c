"""Time to first token and decode speed of Llama-shaped Megatron models, compression off vs on.

    torchrun --nproc-per-node 2 tools/bench_ttft.py --model llama2-13b --out ttft.jsonl
    (prefix NCCL_P2P_DISABLE=1 [NCCL_SHM_DISABLE=1] for the PCIe- and network-class links)

Random weights (timing only; accuracy is tools/eval_quality.py's job), bf16, SDPA attention, the
size gate on (as users run it). Outlier codecs get a synthetic calibration (timing does not depend
on which channels are outliers). For each (batch, prompt) every codec is timed in the same run as
compression off; TTFT is the median of several prefills, decode the tokens/s of a greedy run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.distributed as dist

MODELS = {
    # name: (layers, hidden, ffn, heads, kv heads, vocab)
    "llama2-13b": (40, 5120, 13824, 40, 40, 32000),
    "llama2-70b": (80, 8192, 28672, 64, 8, 32000),
    "tiny": (2, 256, 512, 4, 2, 512),
}


def synthetic_calibration(model, world: int, hidden: int, ratio: int):
    from tpcomp_megatron.calibration import Calibration

    k = -(-hidden // ratio)
    names = [n for n, _ in model.named_modules() if n.endswith(("self_attention.linear_proj", "mlp.linear_fc2"))]
    lo, hi = torch.full((world + 1, hidden), -8.0), torch.full((world + 1, hidden), 8.0)
    chans = torch.arange(k) * (hidden // k)
    return Calibration(meta={"tp_size": world, "hidden": hidden, "model": "synthetic"},
                       stats={n: (lo, hi) for n in names}, channels={n: chans for n in names})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama2-13b")
    ap.add_argument("--layers", type=int, help="override the layer count (e.g. to fit 70B on two GPUs)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=16384, help="skip batch x prompt above this")
    ap.add_argument("--codecs", nargs="+", default=["fp4_e2m1/b32/e8m0", "outlier_int4/k64", "outlier+fp4_e2m1/b32"])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-bytes", type=int, default=None, help="override the gate threshold")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tpcomp_megatron.comm import detect_link
    from tpcomp_megatron.inference.loop import greedy_generate
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.megatron.cpu import megatron_device_context
    from tpcomp_megatron.models.core.builder import build_gpt_model
    from tpcomp_megatron.models.core.config import LlamaModelConfig
    from tpcomp_megatron.models.core.sdpa import use_sdpa

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layers, hidden, ffn, heads, kv, vocab = MODELS[args.model]
    layers = args.layers or layers
    cfg = LlamaModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                           num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab,
                           max_position_embeddings=max(args.prompts) + args.decode_tokens + 8,
                           tensor_parallel_size=world, params_dtype="bfloat16" if cuda else "float32")
    link = detect_link()
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "date": datetime.date.today().isoformat(),
            "command": " ".join(f"{k}={os.environ[k]}" for k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE") if k in os.environ)
            + f" torchrun --nproc-per-node {world} " + " ".join(sys.argv),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "model": f"{args.model}-shape", "layers": layers, "world_size": world, "link": link}
    out = open(args.out, "a") if rank == 0 else None
    with megatron_device_context(device):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        model_parallel_cuda_manual_seed(1234)
        model = build_gpt_model(cfg, layer_spec_transform=use_sdpa, parallel_output=False,
                                use_cpu_initialization=not cuda).to(device).eval()
        configs = [("none", None)]
        for spec in args.codecs:
            c = CompressionConfig(spec=spec, calibration="synthetic" if spec.startswith("outlier") else None,
                                  min_bytes=args.min_bytes)
            configs.append((spec, c))
        for batch in args.batch:
            for prompt_len in args.prompts:
                if batch * prompt_len > args.max_tokens:
                    continue
                g = torch.Generator().manual_seed(prompt_len + batch)
                prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
                base = None
                for spec, c in configs:
                    handle = None
                    if c is not None:
                        cal = synthetic_calibration(model, world, hidden, c.reduce_spec.ratio) if c.calibration else None
                        handle = apply_tp_compression(model, c, calibration=cal)
                    greedy_generate(model, prompt, 1, vocab_size=vocab)  # warm-up (kernels, workspaces)
                    ttft = statistics.median(greedy_generate(model, prompt, 1, vocab_size=vocab).ttft_s for _ in range(args.reps))
                    dec = greedy_generate(model, prompt[:, :128], args.decode_tokens, vocab_size=vocab).decode_tokens_per_s
                    if handle is not None:
                        handle.remove()
                    t = torch.tensor([ttft, -dec], device=device)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # slowest rank decides
                    ttft, dec = t[0].item(), -t[1].item()
                    if base is None:
                        base = (ttft, dec)
                    rec = dict(meta, codec=spec, batch=batch, prompt_tokens=prompt_len, ttft_ms=ttft * 1e3,
                               baseline_ttft_ms=base[0] * 1e3, speedup=base[0] / ttft, decode_tokens_per_s=dec,
                               baseline_decode_tokens_per_s=base[1])
                    if out:
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        print(f"{link:13s} b{batch} p{prompt_len:5d} {spec:28s} TTFT {ttft * 1e3:9.2f} ms "
                              f"(x{base[0] / ttft:4.2f})  decode {dec:8.1f} tok/s (x{dec / base[1]:4.2f})", flush=True)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
