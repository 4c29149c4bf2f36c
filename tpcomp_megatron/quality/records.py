"""Result records (`benchmarks/results/quality_*.jsonl`, fields in benchmarks/results/README.md) and where they go."""

from __future__ import annotations

import datetime
import json
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .metrics import Totals

RESULTS_DIR = Path("benchmarks") / "results"


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


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False)
    rev = out.stdout.strip() or "unknown"
    return rev + ("-dirty" if dirty.stdout.strip() else "")


def default_results_path(model: str, date: str | None = None) -> Path:
    date = date or datetime.date.today().isoformat()
    return RESULTS_DIR / f"quality_{slug(model)}_cpu-{slug(cpu_name())}_{date}.jsonl"


def environment() -> dict:
    """device / date / command / git, shared by every record of one run."""
    return {"device": f"CPU: {cpu_name()}", "date": datetime.date.today().isoformat(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
            "git": git_commit()}


def quality_record(*, model: str, text: str, totals: Totals, baseline: Totals, world_size: int, simulated: bool,
                   codec: str, bits: float, calibration: str, env: dict, **extra) -> dict:
    base = baseline.ppl
    rec = {"model": model, "text": text, "tokens_scored": totals.tokens, "world_size": world_size,
           "simulated_tp": simulated, "codec": codec, "bits_per_value": round(bits, 4), "calibration": calibration,
           "ppl": totals.ppl, "baseline_ppl": base, "ppl_increase_pct": 100.0 * (totals.ppl / base - 1.0),
           "ppl_increase_se_pct": totals.ppl_increase_se_pct(),
           "top1_agreement": totals.top1_agreement, "kl": totals.mean_kl}
    rec.update(extra)
    rec.update(env)
    return rec


def append_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=False) + "\n" for r in records)


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
