"""`tpcomp-eval-quality`: perplexity, top-1 agreement and KL of compressed TP communication.

    tpcomp-eval-quality --model smollm2-135m --tp 2 4 8 --sweep default \\
        --calibration calibration/smollm2-135m_tp{tp}.safetensors
    tpcomp-eval-quality --model smollm2-135m --tp 2 --real-ranks --codecs fp4_e2m1/b32/e8m0 ...

Scores held-out real text (default: the start of Moby Dick, never the calibration text) with the
unmodified model and with every sweep point, simulated in one process (default) or on real gloo
ranks through `apply_tp_compression` (`--real-ranks`). One JSON record per point is appended to
`--out` (default quality_<model>_<cpu>_<date>.jsonl in ~/.cache/tpcomp-megatron/results, or under
$TPCOMP_CACHE; the path is printed first); tools/plot_quality.py
turns the file into a Markdown table and the bits/value vs perplexity-increase plot.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import Calibration
from ..console import say
from ..quiet import VERBOSE_HELP
from .calib import load_for_evaluation
from .sweep import SWEEPS, SweepPoint, point_codecs


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation run."""

    model: str
    """Known model name (smollm2-135m, gemma3-270m) or a Hugging Face folder."""
    tp: tuple[int, ...] = (2, 4, 8)
    """TP sizes to evaluate every point at."""
    points: tuple[str, ...] = SWEEPS["default"]
    """Sweep points in the runtime grammar (codecs/point.py), `SPEC[:rule=RULE][:algo=one_shot|two_shot][:feedback=on]`."""
    calibration: str | None = None
    """Calibration file ('{tp}' is replaced by the TP size); needed by outlier codecs."""
    text: str = "moby-dick"
    """Evaluation text spec."""
    seq_len: int = 512
    """Text tokens per window."""
    windows: int = 8
    """Windows scored."""
    offset: int = 0
    """First text token used."""
    real_ranks: bool = False
    """Run on real gloo ranks (converted Megatron model) instead of simulated TP."""
    out: str | None = None
    """JSON Lines file the records are appended to."""
    skip_done: bool = False
    """Skip points whose record (same model, text, TP, codec, rule, algorithm, mode) is already in `out`."""
    threads: int = 1
    """torch threads (simulated runs); the machine is shared."""
    rotation: int | None = None
    """EXPERIMENTAL, simulation only: a rotation of this size in front of every point's block codec."""

    def __post_init__(self) -> None:
        if not self.tp or any(not isinstance(t, int) or t < 2 for t in self.tp):
            raise ValueError(f"--tp needs TP sizes >= 2, got {list(self.tp)}")
        if not self.points:
            raise ValueError("no sweep points: pass --sweep or --codecs")
        if self.seq_len < 2 or self.windows < 1 or self.offset < 0 or self.threads < 1:
            raise ValueError("--seq-len >= 2, --windows >= 1, --offset >= 0 and --threads >= 1 are required")
        if self.real_ranks and self.rotation is not None:
            raise ValueError("--rotation is simulation-only (no collective exists for it); drop it with --real-ranks")
        for tp in self.tp:  # parse now: a typo fails before the model loads
            for p in self.points:
                SweepPoint.parse(p, tp, rotation=self.rotation)

    def calibration_path(self, tp: int) -> Path | None:
        return Path(self.calibration.replace("{tp}", str(tp))) if self.calibration else None


def _load_calibrations(cfg: EvalConfig, points: list[SweepPoint], model_id: str, hidden: int, text_spec: str) -> dict[int, tuple[Calibration, str]]:
    out = {}
    for tp in sorted({p.tp for p in points if p.needs_calibration}):
        path = cfg.calibration_path(tp)
        if path is None:
            raise ValueError(f"calibrated (outlier, low-rank) codecs at TP={tp} need --calibration (make one with tpcomp-calibrate --tp {tp})")
        if not path.exists():
            raise FileNotFoundError(f"calibration file {path} does not exist; run tpcomp-calibrate --tp {tp} --output {path}")
        out[tp] = (load_for_evaluation(str(path), tp=tp, hidden=hidden, model=model_id, eval_text=text_spec), str(path))
    return out


def _calibration_label(point: SweepPoint, cals: dict) -> str:
    if not point.needs_calibration:
        return "none"
    return cals[point.tp][0].label()


def _done_key(r: dict) -> tuple:
    return (r["model"], r["text"], r["tokens_scored"], r["world_size"], r["simulated_tp"], r["codec"],
            r.get("outlier_rule"), r.get("algorithm", "one_shot"), r.get("error_feedback", False))


def evaluate(cfg: EvalConfig, *, log=say) -> list[dict]:
    from .models import load_model, model_folder
    from .records import (append_records, default_results_path, environment, point_label, quality_record,
                          read_records, summary_line)
    from .simtp import SimulatedTP
    from .text import canonical_text_spec, make_windows

    torch.set_num_threads(cfg.threads)
    model, tok, model_id = load_model(cfg.model)
    windows = make_windows(tok, cfg.text, seq_len=cfg.seq_len, windows=cfg.windows, offset=cfg.offset)
    out = Path(cfg.out) if cfg.out else default_results_path(model_id)
    log(f"records of {model_id} will be appended to {out}")
    sim = SimulatedTP(model)
    hidden = sim.hidden
    points = [SweepPoint.parse(p, tp, rotation=cfg.rotation) for tp in cfg.tp for p in cfg.points]
    cals = _load_calibrations(cfg, points, model_id, hidden, canonical_text_spec(cfg.text))

    def rule_of(p: SweepPoint) -> str | None:
        return (p.rule or cals[p.tp][0].meta["rule"]) if p.outlier else None

    if cfg.skip_done:
        done = {_done_key(r) for r in read_records(out)}
        points = [p for p in points if (model_id, windows.description, windows.tokens_scored, p.tp, not cfg.real_ranks,
                                        p.codec_label, rule_of(p), p.algorithm, p.feedback) not in done]
        log(f"{len(points)} points left to run")
    if not points:
        return []
    env = environment()
    common = dict(model=model_id, text=windows.description, env=env)
    t0 = time.perf_counter()
    records = []
    if cfg.real_ranks:
        first = next(iter(sim.layers))
        bits = {p: point_codecs(p, [first], hidden, cals[p.tp][0] if p.tp in cals else None)[first].bits_per_value(hidden)
                for p in points}
        sim.remove()
        folder = model_folder(cfg.model)
        for tp in sorted({p.tp for p in points}):
            records += _evaluate_real(folder, model_id, tp, [p for p in points if p.tp == tp], cals, windows, common,
                                      rule_of, bits, log)
    else:
        from .sweep import run_simulated

        res = run_simulated(model, sim, windows, points, {tp: c for tp, (c, _) in cals.items()}, log=log)
        for p in points:
            records.append(quality_record(totals=res.totals[p], baseline=res.baseline, world_size=p.tp, simulated=True,
                                          codec=p.codec_label, bits=res.bits[p], calibration=_calibration_label(p, cals),
                                          algorithm=p.algorithm, outlier_rule=rule_of(p), error_feedback=p.feedback,
                                          experimental=p.experimental,
                                          seconds=round(res.seconds[p], 1), **common))
    append_records(out, records)
    log(f"{len(records)} records in {time.perf_counter() - t0:.0f} s -> {out}")
    for r in records:
        log("  " + summary_line(r, f"TP={r['world_size']} {'sim' if r['simulated_tp'] else 'real'} {point_label(r):46s}"))
    return records


def _evaluate_real(folder, model_id, tp, points, cals, windows, common, rule_of, bits, log) -> list[dict]:
    from ..codecs import parse_codec_spec
    from .realtp import RealPoint, evaluate_on_ranks
    from .records import quality_record

    real = [RealPoint(spec=p.spec, calibration=cals[tp][1] if p.needs_calibration else None,
                      ratio=parse_codec_spec(p.spec).ratio if p.outlier else None,
                      rule=p.rule, algorithm=p.algorithm, feedback=p.feedback) for p in points]
    base, totals, seconds, fallbacks = evaluate_on_ranks(folder, model_id, tp, windows, real, log=log)
    return [quality_record(totals=tot, baseline=base, world_size=tp, simulated=False, codec=p.spec, bits=bits[p],
                           calibration=_calibration_label(p, cals), algorithm=p.algorithm, outlier_rule=rule_of(p),
                           error_feedback=p.feedback, experimental=False, seconds=round(sec, 1), exact_fallback_calls=fb, **common)
            for p, tot, sec, fb in zip(points, totals, seconds, fallbacks)]


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    ap = argparse.ArgumentParser(prog="tpcomp-eval-quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, a Hugging Face folder or a .gguf file")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--sweep", choices=sorted(SWEEPS), default="default", help="a built-in list of sweep points")
    group.add_argument("--codecs", nargs="+", help="sweep points SPEC[:rule=RULE][:algo=one_shot|two_shot][:feedback=on] "
                       "(what --tp-comm-compression takes)")
    ap.add_argument("--calibration", help="calibration file; '{tp}' is replaced by the TP size")
    ap.add_argument("--text", default="moby-dick")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--real-ranks", action="store_true", help="real gloo ranks through apply_tp_compression")
    ap.add_argument("--out", help="JSON Lines output (appended; default: a file in ~/.cache/tpcomp-megatron/results)")
    ap.add_argument("--skip-done", action="store_true", help="skip points already recorded in --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rotation", type=int, metavar="G", help="EXPERIMENTAL, simulation only: a randomized Hadamard "
                    "rotation of size G in front of every point's block codec (e.g. --sweep rotation --rotation 64)")
    ap.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    a = ap.parse_args(argv)
    return EvalConfig(model=a.model, tp=tuple(a.tp), points=tuple(a.codecs or SWEEPS[a.sweep]), calibration=a.calibration,
                      text=a.text, seq_len=a.seq_len, windows=a.windows, offset=a.offset, real_ranks=a.real_ranks,
                      out=a.out, skip_done=a.skip_done, threads=a.threads, rotation=a.rotation)


def main(argv: list[str] | None = None) -> int:
    from .records import nonfinite_summary

    try:
        bad = nonfinite_summary(evaluate(parse_args(argv)))
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # NonFiniteLogits of the uncompressed model too
        print(f"tpcomp-eval-quality: error: {e}", file=sys.stderr)
        return 2
    if bad:
        print(f"tpcomp-eval-quality: error: {bad}", file=sys.stderr)
        return 2
    return 0
