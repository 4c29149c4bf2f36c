"""Markdown table and bits/value vs perplexity-increase plot (Pareto front per model) from quality JSON Lines.

    python tools/plot_quality.py benchmarks/results/quality_*.jsonl --out benchmarks/results/quality_cpu-amd-epyc_2026-11-23

Writes `<out>.md` (per model: the best setting at <= 4.5 bits/value, the most compressive within 1% and
3% perplexity increase, the Pareto front, and every record) and `<out>.png` (one panel per model,
one colour per TP size; simulated one-shot points as dots with their Pareto front as a line,
experimental (rotation) points hollow, two-shot points as triangles, real-rank points as crosses).
Files from several runs may be given together; records are grouped by model.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

TARGET_BITS = 4.5


def load(paths: list[Path]) -> list[dict]:
    recs = []
    for p in paths:
        recs += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    if not recs:
        raise SystemExit("no records in " + ", ".join(map(str, paths)))
    texts = defaultdict(set)
    for r in recs:
        texts[r["model"]].add((r["text"], r["tokens_scored"]))
    mixed = {m: sorted(t) for m, t in texts.items() if len(t) > 1}
    if mixed:  # perplexities of different texts are not comparable, nor is one page header right
        model, scored = next(iter(mixed.items()))
        raise SystemExit(f"records of {model} were scored on {len(scored)} different texts "
                         f"({'; '.join(f'{t} ({n} tokens)' for t, n in scored)}): plot each text's file separately")
    return recs


def label(r: dict) -> str:
    extra = [f"rule={r['outlier_rule']}"] if r.get("outlier_rule") else []
    extra += ["two-shot"] if r.get("algorithm") == "two_shot" else []
    # Sensitivity plans already say ", feedback" in their codec label.
    extra += ["feedback"] if r.get("error_feedback") and not r["codec"].endswith(", feedback") else []
    extra += ["real ranks"] if not r["simulated_tp"] else []
    extra += ["experimental"] if r.get("experimental") else []
    return r["codec"] + (f" ({', '.join(extra)})" if extra else "")


def pareto(recs: list[dict]) -> list[dict]:
    """Points no other point beats on both bits/value and perplexity increase (lower is better)."""
    front, best = [], float("inf")
    for r in sorted(recs, key=lambda r: (r["bits_per_value"], r["ppl_increase_pct"])):
        if r["ppl_increase_pct"] < best:
            front.append(r)
            best = r["ppl_increase_pct"]
    return front


def most_compressive(recs: list[dict], limit_pct: float) -> dict | None:
    ok = [r for r in recs if r["ppl_increase_pct"] <= limit_pct]
    return min(ok, key=lambda r: (r["bits_per_value"], r["ppl_increase_pct"])) if ok else None


def best_within_bits(recs: list[dict], bits: float) -> dict | None:
    ok = [r for r in recs if r["bits_per_value"] <= bits + 1e-9]
    return min(ok, key=lambda r: r["ppl_increase_pct"]) if ok else None


def _row(r: dict | None) -> str:
    if r is None:
        return "| - | - | - | - | - | - |"
    se = r.get("ppl_increase_se_pct")
    inc = f"{r['ppl_increase_pct']:+.2f}%" + (f" ± {se:.2f}" if se is not None else "")
    return (f"| {label(r)} | {r['bits_per_value']:.3f} | {r['ppl']:.3f} | {inc} "
            f"| {r['top1_agreement']:.4f} | {r['kl']:.4f} |")


HEAD = "| codec | bits/value | ppl | ppl increase (± 1 SE) | top-1 agreement | KL (nats) |\n|---|---|---|---|---|---|"


def markdown(recs: list[dict]) -> str:
    out = []
    by_model = defaultdict(list)
    for r in recs:
        by_model[r["model"]].append(r)
    for model, mrecs in by_model.items():
        r0 = mrecs[0]
        out.append(f"## {model}\n")
        out.append(f"Text: {r0['text']} ({r0['tokens_scored']} tokens scored); baseline perplexity "
                   f"{r0['baseline_ppl']:.3f} (simulated runs: the unmodified Hugging Face model).  ")
        out.append(f"Device: {', '.join(sorted({r['device'] for r in mrecs}))}; dates {', '.join(sorted({r['date'] for r in mrecs}))}; "
                   f"git {', '.join(sorted({r['git'] for r in mrecs}))}.\n")
        groups = defaultdict(list)
        for r in mrecs:
            groups[(r["world_size"], r["simulated_tp"])].append(r)
        out.append("### Headline per TP size\n")
        out.append("| TP | mode | question | " + HEAD.split("\n")[0][2:] + "\n|---|---|---|---|---|---|---|---|---|")
        for (tp, sim), g in sorted(groups.items(), key=lambda kv: (not kv[0][1], kv[0][0])):
            mode = "simulated" if sim else "real ranks"
            deployable = [r for r in g if not r.get("experimental")]
            for q, pick in ((f"best at <= {TARGET_BITS} bits", lambda rs: best_within_bits(rs, TARGET_BITS)),
                            ("most compressive within 1%", lambda rs: most_compressive(rs, 1.0)),
                            ("most compressive within 3%", lambda rs: most_compressive(rs, 3.0))):
                r, r_any = pick(deployable), pick(g)
                out.append(f"| {tp} | {mode} | {q} " + _row(r))
                if r_any is not r and r_any is not None:  # an experimental codec does better
                    out.append(f"| {tp} | {mode} | {q}, experimental included " + _row(r_any))
        out.append("")
        for (tp, sim), g in sorted(groups.items(), key=lambda kv: (not kv[0][1], kv[0][0])):
            out.append(f"### TP={tp}, {'simulated' if sim else 'real ranks'}: every point (Pareto front in bold)\n")
            out.append(HEAD)
            front = {id(r) for r in pareto(g)}
            for r in sorted(g, key=lambda r: (r["bits_per_value"], r["ppl_increase_pct"])):
                row = _row(r)
                out.append(row.replace(f"| {label(r)} |", f"| **{label(r)}** |", 1) if id(r) in front else row)
            out.append("")
    return "\n".join(out)


def plot(recs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in recs})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    colors = {2: "tab:blue", 4: "tab:orange", 8: "tab:green"}
    for ax, model in zip(axes[0], models):
        mrecs = [r for r in recs if r["model"] == model]
        for tp in sorted({r["world_size"] for r in mrecs}):
            c = colors.get(tp, "tab:gray")
            at_tp = [r for r in mrecs if r["world_size"] == tp]
            kinds = (  # (records, marker, label); the front runs over deployable one-shot points
                ([r for r in at_tp if r["simulated_tp"] and not r.get("experimental") and r.get("algorithm") != "two_shot"],
                 dict(marker="o", s=16, color=c, alpha=0.7), f"TP={tp} simulated"),
                ([r for r in at_tp if r.get("experimental")],
                 dict(marker="o", s=22, facecolors="none", edgecolors=c), f"TP={tp} experimental (rotation)"),
                ([r for r in at_tp if r.get("algorithm") == "two_shot"],
                 dict(marker="^", s=22, color=c, alpha=0.7), f"TP={tp} two-shot"),
                ([r for r in at_tp if not r["simulated_tp"]], dict(marker="x", s=40, color=c), f"TP={tp} real ranks"),
            )
            for i, (rs, style, name) in enumerate(kinds):
                if not rs:
                    continue
                ax.scatter([r["bits_per_value"] for r in rs], [max(r["ppl_increase_pct"], 0.01) for r in rs],
                           label=name, **style)
                if i == 0:
                    front = pareto(rs)
                    ax.plot([r["bits_per_value"] for r in front], [max(r["ppl_increase_pct"], 0.01) for r in front],
                            color=c, lw=1.5)
        for y, ls in ((1.0, "--"), (3.0, ":")):
            ax.axhline(y, color="k", ls=ls, lw=0.8)
        ax.axvline(TARGET_BITS, color="r", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("bits / value (payload, scales included)")
        ax.set_ylabel("perplexity increase, % (log; <= 0 drawn at 0.01)")
        ax.set_title(f"{model}: Pareto front of deployable one-shot codecs per TP size")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="output stem (default: the first input without .jsonl)")
    a = ap.parse_args()
    recs = load(a.jsonl)
    stem = a.out or a.jsonl[0].with_suffix("")
    Path(str(stem) + ".md").write_text("# Quality of compressed TP communication\n\n" + markdown(recs) + "\n")
    plot(recs, Path(str(stem) + ".png"))
    print(f"wrote {stem}.md and {stem}.png")


if __name__ == "__main__":
    main()
