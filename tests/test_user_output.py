"""What a user of the evaluation tools sees (issue 34): progress that reaches a pipe as it happens,
summary lines that name every part of a point, records that say where they came from and go to a
per-user folder, a GGUF model named by its header."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpcomp_megatron import __version__
from tpcomp_megatron.provenance import checkout_commit, gguf_model_name, provenance, source_model_name

ROOT = Path(__file__).resolve().parents[1]
POINTS = ["fp4_e2m1/b32/e6m2", "fp4_e2m1/b32/e6m2:feedback=on"]


def test_eval_tool_through_a_pipe(tiny, tmp_path):
    """Progress lines arrive while the tool runs (stdout to a pipe is block-buffered: before, every
    line came at the end); the summary tells feedback on from off; without --out the records go to
    the per-user results folder, said first, nothing is written where the command runs; every
    record carries the package version and the checkout's commit."""
    exe = shutil.which("tpcomp-eval-quality") or pytest.skip("tpcomp-eval-quality is not installed")
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "TPCOMP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [exe, "--model", tiny["hf"], "--tp", "2", "--codecs", *POINTS, "--text", tiny["text"], "--seq-len", "64",
           "--windows", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work, env=env)
    arrived = []
    for line in proc.stdout:
        arrived.append((time.perf_counter(), line.rstrip("\n")))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    lines = [text for _, text in arrived]
    first = next(t for t, text in arrived if text.startswith("window 1/30"))
    # 29 more windows of 3 forwards each follow the first line: at least a few tenths of a second
    assert arrived[-1][0] - first > 0.3, "the progress lines all arrived at the end"

    results = cache / "results"
    assert lines[0].startswith("records of hf will be appended to ") and str(results) in lines[0]
    assert list(work.iterdir()) == []
    summary = [text for text in lines if text.startswith("  TP=2 sim ")]
    assert len(summary) == 2 and len(set(s.split()[2] for s in summary)) == 2
    assert summary[1].split()[2] == POINTS[1]

    (out,) = results.glob("quality_hf_*.jsonl")
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["error_feedback"] for r in records] == [False, True]
    assert all(r["version"] == __version__ and r["git"] == checkout_commit() for r in records)


def test_provenance_is_the_package_checkout_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git repository: the commit comes from the package's checkout
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("the package does not run from a git checkout")
    got = provenance()
    assert got["version"] == __version__
    assert got["git"].removesuffix("-dirty") == head.stdout.strip()


def _write_gguf(path: Path, **fields) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_is_named_by_its_header(tmp_path):
    named = _write_gguf(tmp_path / "model.gguf", **{"general.name": "Qwen2.5 0.5B Instruct", "general.size_label": "0.5B"})
    assert gguf_model_name(named) == "Qwen2.5 0.5B Instruct (llama, 0.5B)"
    assert source_model_name(str(named)) == "Qwen2.5 0.5B Instruct (llama, 0.5B)"
    (tmp_path / "anon").mkdir()
    bare = _write_gguf(tmp_path / "anon" / "model.gguf")
    assert gguf_model_name(bare) == "model.gguf (llama)"
    assert source_model_name(str(tmp_path / "some-hf-folder")) == "some-hf-folder"


def test_recipes_record_version_and_commit(tiny, tmp_path):
    from tpcomp_megatron.quality.recipes import write_recipe
    from tpcomp_megatron.recipe import load_recipe

    layers = {f"decoder.layers.{i}.{k}": "fp6_e2m3/b32/e8m0" for i in range(2) for k in ("self_attention.linear_proj",
                                                                                           "mlp.linear_fc2")}
    path = write_recipe(tmp_path / "r.safetensors", model=tiny["model"], model_id="tiny", tp=2, layers=layers,
                        feedback=False, rule=None, calibration=None)
    made_by = load_recipe(str(path)).made_by
    assert made_by["version"] == __version__
    assert made_by["commit"] == (checkout_commit() or "none (not run from a checkout)")


def test_default_results_path_is_per_user(monkeypatch, tmp_path):
    from tpcomp_megatron.quality.records import default_results_path

    monkeypatch.setenv("TPCOMP_CACHE", str(tmp_path / "c"))
    monkeypatch.chdir(tmp_path)
    path = default_results_path("smollm2-135m")
    assert path.is_absolute() and path.parent == tmp_path / "c" / "results"


def test_compare_says_where_greedy_parts_and_the_margin_there():
    """The lines of generate.py --compare: greedy decoding and the teacher-forced prefill named
    apart; where greedy first differs, the exact model's top-2 margin there and its median."""
    import torch

    from tpcomp_megatron.inference.compare import compare_lines

    prompt, vocab = 3, 5
    exact = torch.tensor([1, 2, 3, 4])
    compressed = torch.tensor([1, 2, 0, 0])  # parts at token 3, where the exact model is near a tie
    logits = torch.full((prompt + len(exact), vocab), -5.0)
    for step, tok in enumerate(exact.tolist()):
        logits[prompt - 1 + step, tok] = 5.0  # confident steps: margin 10
    logits[prompt + 1, 0] = 4.9  # step 3: token 3 at 5.0, token 0 at 4.9
    lines = compare_lines(exact, compressed, logits, logits.clone(), prompt, lambda ids: f"<{ids[0]}>")
    assert lines[0] == "compressed vs exact:"
    assert "greedy decoding" in lines[1] and "first 2 of 4 tokens identical; at token 3 exact chose '<3>'" in lines[1]
    assert "compressed '<0>'" in lines[1] and "top-2 margin there is 0.10 nats, its median over the 4 steps 10.00" in lines[1]
    assert "teacher-forced prefill" in lines[2] and "top-1 agreement 100.0%" in lines[2]
    same = compare_lines(exact, exact.clone(), logits, logits, prompt, str)
    assert "all 4 tokens identical" in same[1]


def test_calibration_size_is_said_up_front(tiny, tmp_path):
    from tpcomp_megatron.quality.calibrate_cli import CalibrateConfig, calibrate

    lines = []
    (path,) = calibrate(CalibrateConfig(model=tiny["hf"], tp=(2,), output=str(tmp_path / "c_tp{tp}.safetensors"),
                                        text=tiny["cal_text"], seq_len=64, tokens=128, directions=8), log=lines.append)
    said = lines[0]
    assert said.startswith("TP=2: the calibration file will be about ") and "8 low-rank directions" in said
    number, unit = said.split("about ")[1].split(":")[0].split()
    size = float(number) * {"KiB": 2**10, "MiB": 2**20}[unit]
    # the tensors, to the rounding shown; the safetensors header (names, metadata) adds a few KiB here
    assert size - 2**9 <= path.stat().st_size <= size + 16 * 2**10
