"""Plots and Markdown tables from benchmark JSON Lines (benchmarks/results/*.jsonl).

    python tools/plot_results.py collectives benchmarks/results/collectives_X.jsonl   # speedup vs size per link
    python tools/plot_results.py ttft benchmarks/results/ttft_X.jsonl                 # TTFT speedup vs prompt

Writes `<input>.png` and `<input>.md` next to the input.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

LINKS = ("nvlink", "pcie_class", "network_class")


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _header(recs: list[dict]) -> str:
    r = recs[0]
    return (f"Device: {', '.join(sorted({x['device'] for x in recs}))}; date {', '.join(sorted({x['date'] for x in recs}))}; "
            f"git {', '.join(sorted({x['git'] for x in recs}))}.\nCommand: `{r['command']}` (once per link class).\n")


def collectives(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _load(path)
    links = [lk for lk in LINKS if any(r["link"] == lk for r in recs)]
    fig, axes = plt.subplots(1, len(links), figsize=(6 * len(links), 4.5), squeeze=False)
    for ax, link in zip(axes[0], links):
        series = defaultdict(dict)
        for r in recs:
            if r["link"] == link and r["algorithm"] != "nccl" and not r["graph"]:
                series[f"{r['op']}/{r['algorithm']}"].setdefault(r["bytes_bf16"], []).append(r["speedup"])
        for name, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.plot([x / 2**20 for x in xs], [min(pts[x]) for x in xs], marker="o", ms=3, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{link} (eager; worst over hidden sizes)")
        ax.set_xlabel("message size, MiB of bf16")
        ax.set_ylabel("speedup vs NCCL bf16")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    lines = ["# Compressed collectives vs NCCL bf16", "", _header(recs),
             "| link | mode | op | algorithm | tokens x hidden | MiB bf16 | ms | NCCL ms | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (LINKS.index(r["link"]) if r["link"] in LINKS else 9, r["graph"], r["op"], r["algorithm"], r["bytes_bf16"])):
        if r["algorithm"] == "nccl":
            continue
        lines.append(f"| {r['link']} | {'graph' if r['graph'] else 'eager'} | {r['op']} | {r['algorithm']} | "
                     f"{r['tokens']}x{r['hidden']} | {r['bytes_bf16'] / 2**20:.2f} | {r['ms']:.4f} | {r['baseline_ms']:.4f} | {r['speedup']:.2f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def ttft(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _load(path)
    models = sorted({r["model"] for r in recs})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        series = defaultdict(dict)
        for r in recs:
            if r["model"] == model and r["codec"] != "none" and r["batch"] == 1:
                series[f"{r['link']} {r['codec']}"][r["prompt_tokens"]] = r["speedup"]
        for name, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", ms=3, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}, batch 1")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT speedup vs uncompressed")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    lines = ["# Time to first token and decode, compression off vs on", "", _header(recs),
             "| model | layers | link | codec | batch | prompt | TTFT ms | off ms | speedup | decode tok/s | off tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['model']} | {r['layers']} | {r['link']} | {r['codec']} | {r['batch']} | {r['prompt_tokens']} | "
                     f"{r['ttft_ms']:.1f} | {r['baseline_ttft_ms']:.1f} | {r['speedup']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['baseline_decode_tokens_per_s']:.1f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["collectives", "ttft"])
    ap.add_argument("path", type=Path)
    args = ap.parse_args()
    {"collectives": collectives, "ttft": ttft}[args.kind](args.path)


if __name__ == "__main__":
    main()
