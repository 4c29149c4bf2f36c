"""Markdown tables of a host-cost and one-rank-prefill run (tools/gpu_overhead.sh), builds side by side.

    python tools/summarize_overhead.py --host host.jsonl --prefill prefill.jsonl [--kernels kernels.jsonl]

Each table compares the builds (`tag`: base, new) measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

TARGETS = {(2, 512): 12, (2, 2048): 6, (2, 8192): 5, (8, 2048): 10, (8, 8192): 10}
"""Prefill overhead targets of the host-overhead issue (percent, fp4_e2m1/b32/e6m2, eager)."""


def _load(path: str | None) -> list[dict]:
    if not path:
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def host_table(rows: list[dict], codec: str) -> str:
    tags = sorted({r["tag"] for r in rows})
    by = defaultdict(dict)
    order = []
    for r in rows:
        if r["codec"] not in ("none", codec):
            continue
        key = (r["what"], r["world_size"], r["backend"])
        if key not in by:
            order.append(key)
        by[key].setdefault(r["tag"], r)  # the first NCCL reference of each run
    head = "| call | world | group | " + " | ".join(f"{t} us (x NCCL all-reduce)" for t in tags) + " |"
    lines = [head, "|" + "---|" * (3 + len(tags))]
    for key in order:
        cells = []
        for t in tags:
            r = by[key].get(t)
            cells.append(f"{r['us_per_call']:.1f} ({r['ratio_to_nccl_all_reduce']:.2f})" if r else "")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prefill_table(rows: list[dict], pg: str, mode: str) -> str:
    rows = [r for r in rows if r.get("process_group", "fake") == pg and r["mode"] == mode and r["ms"] is not None]
    tags = sorted({r["tag"] for r in rows})
    points = sorted({(r["world_size"], r["prompt_tokens"]) for r in rows})
    codecs = sorted({r["codec"] for r in rows} - {"none"})
    head = "| TP | tokens | " + " | ".join(f"{t}: off ms | {t}: {c} ms (overhead, us/collective)"
                                            for t in tags for c in codecs)
    if mode == "eager":
        head += " | target"
    elif mode == "graph":
        head += " | new: one collective's GPU us vs its kernels + stand-in group"
    lines = [head + " |", "|" + "---|" * (head.count("|"))]
    for tp, tokens in points:
        cells = []
        for t in tags:
            for c in codecs:
                off = next((r for r in rows if (r["tag"], r["world_size"], r["prompt_tokens"], r["codec"]) ==
                            (t, tp, tokens, "none")), None)
                on = next((r for r in rows if (r["tag"], r["world_size"], r["prompt_tokens"], r["codec"]) ==
                           (t, tp, tokens, c)), None)
                cells.append(f"{off['ms']:.2f}" if off else "")
                cells.append(f"{on['ms']:.2f} ({on['overhead_pct']:+.1f}%, {on['overhead_us_per_collective']:.0f})"
                             if on else "")
        if mode == "eager":
            target = TARGETS.get((tp, tokens))
            cells.append(f"<= {target}%" if target else "")
        elif mode == "graph":
            on = next((r for r in rows if (r["tag"], r["world_size"], r["prompt_tokens"]) == ("new", tp, tokens)
                       and r["codec"] != "none" and "collective_graph_us" in r), None)
            cells.append(f"{on['collective_graph_us']:.1f} vs {on['kernels_graph_us']:.1f} + "
                         f"{on['fake_transport_graph_us']:.1f}" if on else "")
        lines.append(f"| {tp} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def modelled_table(rows: list[dict], tag: str) -> str:
    rows = [r for r in rows if r["mode"] == "modelled" and r["tag"] == tag and r["codec"] != "none"]
    links = sorted({r["link"] for r in rows})
    points = sorted({(r["world_size"], r["prompt_tokens"]) for r in rows})
    lines = ["| TP | tokens | " + " | ".join(f"{link}: exact ms / compressed ms (speedup)" for link in links) + " |",
             "|" + "---|" * (2 + len(links))]
    for tp, tokens in points:
        cells = []
        for link in links:
            r = next((r for r in rows if (r["world_size"], r["prompt_tokens"], r["link"]) == (tp, tokens, link)), None)
            cells.append(f"{r['modelled_baseline_ttft_ms']:.1f} / {r['modelled_ttft_ms']:.1f} "
                         f"(x{r['modelled_speedup']:.2f})" if r else "n/a")
        lines.append(f"| {tp} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernels_table(rows: list[dict]) -> str:
    tags = sorted({r["git"] for r in rows})
    by = defaultdict(dict)
    for r in rows:
        by[(r["codec"], r["kernel"], r["elements"])][r["git"]] = r
    lines = ["| codec | kernel | MB (bf16) | " + " | ".join(f"{t}: GPU ms / eager call ms" for t in tags) + " |",
             "|" + "---|" * (3 + len(tags))]
    for (codec, kernel, elements), got in sorted(by.items()):
        cells = [f"{got[t]['ms']:.4f} / {got[t].get('eager_ms', float('nan')):.4f}" if t in got else "" for t in tags]
        lines.append(f"| {codec} | {kernel} | {2 * elements / 2**20:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host")
    ap.add_argument("--prefill")
    ap.add_argument("--kernels")
    ap.add_argument("--codec", default="fp4_e2m1/b32/e6m2")
    args = ap.parse_args()
    host, prefill, kernels = _load(args.host), _load(args.prefill), _load(args.kernels)
    if host:
        print(f"### Host time per eager call, {args.codec}\n\n{host_table(host, args.codec)}\n")
    for pg in sorted({r.get("process_group", "fake") for r in prefill}):
        for mode in ("eager", "graph"):
            if any(r["mode"] == mode and r.get("process_group", "fake") == pg for r in prefill):
                print(f"### Prefill, {mode}, stand-in group `{pg}`\n\n{prefill_table(prefill, pg, mode)}\n")
    if any(r["mode"] == "modelled" for r in prefill):
        print(f"### Modelled TTFT (new build; measured one-rank compute + link table times)\n\n"
              f"{modelled_table(prefill, 'new')}\n")
    if kernels:
        print(f"### Kernels (GPU time under graph replay; eager call wall time)\n\n{kernels_table(kernels)}\n")


if __name__ == "__main__":
    main()
