"""A measured gate table as people read it: text per path, and a plot of speedup against size."""

from __future__ import annotations

from ..comm.gate.table import EXACT, GateTable, SizeRow


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes} B"


def speedup(row: SizeRow, path: str) -> float:
    """Exact time over `path`'s, in the mode where `path` does worst."""
    mine = row.ms[path]
    return min(row.ms[EXACT][m] / mine[m] if mine[m] > 0 else float("inf") for m in mine if m in row.ms[EXACT])


def format_table(table: GateTable) -> str:
    k, meta = table.key, table.meta
    modes = meta.get("modes") or sorted({m for r in table.rows for m in r.ms[EXACT]})
    lines = [f"tpcomp-tune: {k.device}, world size {k.world_size}, link {k.link}, torch {k.torch}, "
             f"NCCL {k.nccl}, table format {k.format}; table {table.digest}",
             f"ms per call of the slowest rank ({' / '.join(modes)}); speedup = exact / path in its worse mode; "
             f"'compress' where the path beat the exact all-reduce by {table.margin:.0%} in every mode"]
    per_forward = meta.get("layers")
    for path in [p for p in table.paths if p != EXACT]:
        lossless = path.startswith(EXACT)
        lines += ["", f"{path}" + ("  (lossless; for comparison: the gate's exact path is dist.all_reduce)"
                                   if lossless else "")]
        lines.append(f"  {'tokens':>7s} {'message':>10s} {'exact ms':>17s} {'path ms':>17s} {'speedup':>8s}"
                     + ("" if lossless else "  choice") + ("  ms saved/forward" if per_forward and not lossless else ""))
        for r in table.rows:
            if path not in r.ms:
                continue
            ex = " / ".join(f"{r.ms[EXACT][m]:.3f}" for m in modes)
            mine = " / ".join(f"{r.ms[path][m]:.3f}" for m in modes)
            line = f"  {r.tokens:7d} {_size(r.nbytes):>10s} {ex:>17s} {mine:>17s} {speedup(r, path):7.2f}x"
            if not lossless:
                wins = r.wins(path, table.margin)
                line += f"  {'compress' if wins else 'exact':8s}"
                if per_forward:  # two row-parallel all-reduces per layer
                    saved = 2 * per_forward * (r.ms[EXACT]["eager"] - r.ms[path]["eager"]) if wins else 0.0
                    line += f"  {saved:10.3f}"
            lines.append(line.rstrip())
    for note in meta.get("notes", ()):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot(table: GateTable, path: str) -> None:
    """Speedup (exact / path) against message size per path, as a PNG at `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or tpcomp-megatron[tools])") from None
    k = table.key
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in [p for p in table.paths if p != EXACT]:
        pts = [(r.nbytes, speedup(r, p)) for r in table.rows if p in r.ms]
        ax.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=p,
                linestyle="--" if p.startswith(EXACT) else "-")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bf16 message (bytes)")
    ax.set_ylabel("speedup over dist.all_reduce (worse mode)")
    ax.set_title(f"{k.device}, {k.world_size} ranks, {k.link}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
