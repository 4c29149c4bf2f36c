"""Result records (`quality_*.jsonl`, fields in benchmarks/results/README.md) and where they go: `--out`, or
a per-user results folder (`results_dir`); the committed ones live in benchmarks/results/."""

from __future__ import annotations

import datetime
import json
import platform
import re
import shlex
import sys
from pathlib import Path

from ..provenance import provenance
from .metrics import Totals
from .text import cache_dir

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_dir() -> Path:
    """Where records go without `--out`: a per-user folder (under $TPCOMP_CACHE or
    ~/.cache/tpcomp-megatron), never the folder the command is run from."""
    return cache_dir() / "results"


def default_results_path(model: str, date: str | None = None) -> Path:
    date = date or datetime.date.today().isoformat()
    return results_dir() / f"quality_{slug(model)}_cpu-{slug(cpu_name())}_{date}.jsonl"


def environment() -> dict:
    """device / date / command / version / git, shared by every record of one run (`git`: the
    commit of the checkout the package runs from, None for an installed package)."""
    return {"device": f"CPU: {cpu_name()}", "date": datetime.date.today().isoformat(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
            **provenance()}


def quality_record(*, model: str, text: str, totals: Totals, baseline: Totals, world_size: int, simulated: bool,
                   codec: str, bits: float, calibration: str, env: dict, **extra) -> dict:
    base = baseline.ppl
    rec = {"model": model, "text": text, "tokens_scored": totals.tokens, "world_size": world_size,
           "simulated_tp": simulated, "codec": codec, "bits_per_value": round(bits, 4), "calibration": calibration,
           "ppl": totals.ppl, "baseline_ppl": base, "ppl_increase_pct": 100.0 * (totals.ppl / base - 1.0),
           "ppl_increase_se_pct": totals.ppl_increase_se_pct(),
           "top1_agreement": totals.top1_agreement, "kl": totals.mean_kl}
    if totals.nonfinite:  # the figures are NaN: say where the logits broke, never a quiet 'ppl nan'
        rec["nonfinite"] = totals.nonfinite
    rec.update(extra)
    rec.update(env)
    return rec


def point_label(record: dict) -> str:
    """Everything that defines a record's point, in the runtime grammar: `fp4_e2m1/b32/e6m2` and
    `fp4_e2m1/b32/e6m2:feedback=on` are different points and print differently."""
    parts = [record["codec"]]
    if record.get("outlier_rule"):
        parts.append(f"rule={record['outlier_rule']}")
    if record.get("algorithm", "one_shot") != "one_shot":
        parts.append(f"algo={record['algorithm']}")
    if record.get("error_feedback"):
        parts.append("feedback=on")
    return ":".join(parts)


def summary_line(record: dict, label: str) -> str:
    """A record's figures, or, for non-finite logits, where they broke instead of NaN figures."""
    if record.get("nonfinite"):
        return f"{label} {record['bits_per_value']:6.3f} b/v  NON-FINITE logits (NaN or inf): {record['nonfinite']}"
    return (f"{label} {record['bits_per_value']:6.3f} b/v  ppl {record['ppl']:.3f} ({record['ppl_increase_pct']:+.2f}%)  "
            f"top1 {record['top1_agreement']:.4f}  KL {record['kl']:.5f}")


def nonfinite_summary(records: list[dict]) -> str | None:
    """One line naming every record whose logits were non-finite, or None."""
    bad = [f"TP={r['world_size']} {point_label(r)} ({r['nonfinite']})" for r in records if r.get("nonfinite")]
    if not bad:
        return None
    return f"non-finite logits at {len(bad)} of {len(records)} points (marked 'nonfinite' in the records): " + "; ".join(bad)


def append_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=False) + "\n" for r in records)


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
