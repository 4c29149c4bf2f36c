"""Derive the gate's size thresholds from collective benchmark results.

    python tools/derive_gate.py benchmarks/results/collectives_*.jsonl --write

For each (link, world size), the threshold is the smallest bf16 message size from which the
compressed all-reduce (the algorithm and transport `auto` would pick, forced on) is at least as
fast as NCCL at every larger measured size, eager and under CUDA-graph replay. `--write` stores
the table in tpcomp_megatron/comm/gate_table.json, which the gate loads, with its provenance.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "tpcomp_megatron" / "comm" / "gate_table.json"
NEVER = 1 << 62


def derive(records: list[dict], codec: str, min_speedup: float = 1.0) -> dict[tuple[str, int], int]:
    by_key = defaultdict(list)  # (link, world) -> [(bytes, speedup)]
    for r in records:
        if r["op"] != "all_reduce" or r["codec"] != codec:
            continue
        algo = "one_shot" if r["world_size"] <= 3 else "two_shot"
        if r["algorithm"] != algo:
            continue
        by_key[(r["link"], r["world_size"])].append((r["bytes_bf16"], r["speedup"]))
    table = {}
    for key, pts in by_key.items():
        worst = defaultdict(lambda: float("inf"))  # eager and graph: the slower ratio decides
        for b, s in pts:
            worst[b] = min(worst[b], s)
        sizes = sorted(worst)
        threshold = NEVER
        for b in reversed(sizes):  # largest size downwards while compression keeps winning
            if worst[b] < min_speedup:
                break
            threshold = b
        table[key] = threshold
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--codec", default="fp4_e2m1/b32/e8m0")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    records = [json.loads(line) for p in args.results for line in open(p) if line.strip()]
    table = derive(records, args.codec)
    devices = sorted({r["device"] for r in records})
    dates = sorted({r["date"] for r in records})
    doc = {
        "source": f"tools/derive_gate.py over {', '.join(Path(p).name for p in args.results)}",
        "device": ", ".join(devices), "date": ", ".join(dates), "codec": args.codec,
        "thresholds": [{"link": k[0], "world_size": k[1], "min_bytes_bf16": v} for k, v in sorted(table.items())],
    }
    print(json.dumps(doc, indent=1))
    if args.write:
        TABLE.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
