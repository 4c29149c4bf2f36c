"""tools/plot_quality.py refuses records of one model scored on different texts: their
perplexities are not comparable, and the page would name only the first text."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_refuses_records_of_different_texts(tmp_path):
    recs = [{"model": "m", "text": "moby-dick tokens [0, 4096)", "tokens_scored": 4088},
            {"model": "m", "text": "moby-dick tokens [0, 1024)", "tokens_scored": 1022}]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_quality.py"), str(path), "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "records of m were scored on 2 different texts" in run.stderr, run.stderr
    assert not (tmp_path / "q.md").exists()
