"""`tpcomp-sensitivity`: rank the row-parallel reductions by sensitivity, evaluate mixed plans.

    tpcomp-sensitivity --model smollm2-135m --tp 8 --low fp4_e2m1/b32/e6m2 --high fp6_e2m3/b32/e8m0 \\
        --promote 0 2 4 --calib-text sotu-1901 --text moby-dick --windows 8 --out quality.jsonl

Ranks the layers on the calibration text (`sensitivity.layer_sensitivity`, simulated TP), writes
the ranking (`--ranking`, JSON), then evaluates on the evaluation text, for each `--high` codec and
each k of `--promote`, the plan with the k most sensitive layers on that codec and the rest on
`--low`: perplexity, top-1 agreement and KL against the uncompressed model, one quality record per
plan (benchmarks/results/README.md fields plus `plan_low`, `plan_high`, `layers_high`, `ranking_text`). With
`--budget BITS`, each `--high` codec also gets the plan with as many layers as fit the budget:

    tpcomp-sensitivity --model smollm2-135m --tp 8 --budget 4.5 \\
        --high fp5_e2m2/b32/e6m2 fp6_e2m3/b32/e8m0 fp8_e4m3/b32/e8m0up --ranking-in ranking.json

`--allocate` (with `--budget`) gives every layer its own codec among `--low` and the `--high`
codecs: each candidate's single-layer KL is measured for every layer on the calibration text,
and `sensitivity.allocate` picks the plan of least summed KL within the budget; one more record
(`layer_codecs`: layer -> codec) instead of the per-codec budget plans:

    tpcomp-sensitivity --model gemma3-270m --tp 8 --low lowrank+lloyd4/b32/e6m2/r4 --allocate --budget 4.5 \
        --high lowrank+lloyd3/b32/e6m2/r4 lowrank+lloyd5/b32/e6m2/r4 --calibration cal.safetensors --error-feedback

`--recipe PATH` (with `--allocate`) writes the allocated plan as a recipe (recipe.py): every
layer's codec, error feedback and the calibration data the codecs need, deployable as
`--tp-comm-recipe PATH`.

`--from-record FILE` makes one plan from the KLs of a sensitivity record (a `--ranking` file
committed under benchmarks/results/) without running the model: no measurement, no evaluation,
no quality record. The model is loaded only for its fingerprint and layer names. The plan is the
`--allocate --budget` plan, or the promotion plan of one `--high` codec (its `--budget` k or one
`--promote k`); it is printed, and written with `--recipe` (bytes reproducible from the same
command at the same commit):

    tpcomp-sensitivity --model smollm2-135m --tp 8 --low fp4_e2m1/b32/e6m2 --high fp6_e2m3/b32/e8m0 \
        --budget 4.5 --error-feedback --recipe plan.recipe.safetensors \
        --from-record benchmarks/results/sensitivity_smollm2-135m_tp8_e6m2_feedback_cpu-amd-epyc_2026-11-24.json

Calibrated codecs (`lowrank+...`, `outlier...`) need `--calibration` (a `tpcomp-calibrate` file
made at `--tp`, never on the evaluation text).

`--real-ranks` also runs every plan as it is deployed: the converted Megatron model on `--tp` gloo
ranks, `--low` as the codec and one override per promoted layer (`apply_tp_compression`, as
`--tp-comm-compression LOW --tp-comm-compression-override NAME=HIGH ...`); one more record per plan.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codecs import needs_calibration, parse_codec_spec
from ..console import say
from ..quiet import VERBOSE_HELP
from .calib import layer_codecs, load_for_evaluation
from .records import append_records, default_results_path, environment, nonfinite_summary, quality_record, summary_line
from .text import canonical_text_spec


@dataclass(frozen=True, kw_only=True)
class SensitivityConfig:
    model: str
    tp: int = 8
    low: str = "fp4_e2m1/b32/e6m2"
    """Codec of every layer not promoted."""
    high: tuple[str, ...] = ("fp6_e2m3/b32/e8m0",)
    """Codecs of the promoted layers: every plan is evaluated with each (a single string is one)."""
    promote: tuple[int, ...] = (0, 2, 4)
    """Numbers of layers promoted (0: the uniform --low plan)."""
    budget: float | None = None
    """Bits per value: each --high codec also gets the plan with the most layers within it."""
    allocate: bool = False
    """With `budget`: one plan with each layer's codec chosen among --low and --high (`allocate`),
    in place of the per-codec budget plans."""
    calib_text: str = "sotu-1901"
    """Text the layers are ranked on (never the evaluation text)."""
    calib_windows: int = 2
    text: str = "moby-dick"
    windows: int = 8
    seq_len: int = 512
    offset: int = 0
    """First evaluation-text token used (another offset: an independent sample of the same text)."""
    threads: int = 1
    out: str | None = None
    ranking: str | None = None
    ranking_in: str | None = None
    """A ranking written by an earlier run (same model, TP size, feedback and calibration text): the
    codecs it measured are reused, not recomputed; any other codec the run needs (--low included)
    is measured."""
    real_ranks: bool = False
    """Also evaluate every plan on real gloo ranks through `apply_tp_compression` (per-layer overrides)."""
    feedback: bool = False
    """Error feedback on, for the ranking and every plan (`--tp-comm-error-feedback` when deployed)."""
    calibration: str | None = None
    """Calibration file for calibrated codecs (low-rank, outlier), made at `tp`."""
    recipe: str | None = None
    """With `allocate` (or `from_record`): write the plan as a recipe file here."""
    from_record: str | None = None
    """A sensitivity record (a `ranking` file): make one plan from its KLs without running the model."""

    def __post_init__(self) -> None:
        if isinstance(self.high, str):
            object.__setattr__(self, "high", (self.high,))
        if not isinstance(self.tp, int) or self.tp < 2:
            raise ValueError(f"--tp must be an integer >= 2 (TP=1 communicates nothing), got {self.tp!r}")
        if not self.high:
            raise ValueError("--high: at least one codec")
        specs = [("low", self.low)] + [("high", h) for h in self.high]
        for name, spec in specs:
            if parse_codec_spec(spec) is None:
                raise ValueError(f"--{name} none: a plan compares codecs, e.g. fp4_e2m1/b32/e6m2")
        if self.calibration is None and any(needs_calibration(parse_codec_spec(s)) for _, s in specs):
            raise ValueError("calibrated codecs (lowrank+..., outlier...) need --calibration (tpcomp-calibrate --tp N)")
        if any(k < 0 for k in self.promote) or not (self.promote or self.budget is not None):
            raise ValueError(f"--promote: one or more layer counts >= 0 (or a --budget), got {list(self.promote)}")
        if self.recipe is not None and not (self.allocate or self.from_record):
            raise ValueError("--recipe writes the --allocate plan (or a --from-record plan): add --allocate --budget BITS")
        if self.from_record is not None:
            self._check_from_record()
        if self.allocate and self.budget is None:
            raise ValueError("--allocate needs --budget (bits per value)")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"--budget must be a positive number of bits per value, got {self.budget!r}")
        if self.calib_text == self.text:
            raise ValueError("ranking on the evaluation text would select layers on the test set: use another --calib-text")
        if min(self.calib_windows, self.windows, self.threads) < 1 or self.seq_len < 2 or self.offset < 0:
            raise ValueError("--calib-windows, --windows, --threads >= 1, --seq-len >= 2 and --offset >= 0 "
                             "are required")

    def _check_from_record(self) -> None:
        clash = [flag for flag, on in (("--ranking-in", self.ranking_in), ("--ranking", self.ranking),
                                       ("--real-ranks", self.real_ranks), ("--out", self.out)) if on]
        if clash:
            raise ValueError(f"--from-record evaluates nothing and measures nothing: drop {', '.join(clash)}")
        one_promotion = len(self.high) == 1 and (len(self.promote) == 1) != (self.budget is not None)
        if not (self.allocate or one_promotion):
            raise ValueError("--from-record makes one plan: --allocate --budget BITS, or one --high codec with "
                             "either --budget BITS or one --promote K")


def run(cfg: SensitivityConfig, *, log=say) -> list[dict]:
    if cfg.from_record is not None:
        plan_from_record(cfg, log=log)
        return []
    from .models import load_model
    from .sensitivity import plan_bits
    from .simtp import SimulatedTP
    from .sweep import Plan, compare
    from .text import make_windows

    torch.set_num_threads(cfg.threads)
    model, tok, model_id = load_model(cfg.model)
    sim = SimulatedTP(model)
    calibration = _calibration(cfg, model_id, sim.hidden)
    low_spec, codecs = _codec_maps(cfg, sim.layers, calibration)
    kl_by_codec, ranking_text = _sensitivities(cfg, model, sim, tok, model_id, codecs, low_spec, log)
    sens = kl_by_codec[low_spec]
    ranking = {"model": model_id, "tp": cfg.tp, "codec": low_spec, "feedback": cfg.feedback, "text": ranking_text,
               "kl": _by_kl(sens)}
    if len(kl_by_codec) > 1:
        ranking["kl_by_codec"] = {c: _by_kl(kl) for c, kl in kl_by_codec.items()}
    if cfg.ranking:
        Path(cfg.ranking).write_text(json.dumps(ranking, indent=1) + "\n")
    windows = make_windows(tok, cfg.text, seq_len=cfg.seq_len, windows=cfg.windows, offset=cfg.offset)
    choices = _promotions(cfg, sens, low_spec, codecs, sim.hidden)
    if cfg.allocate:
        choices.append(_allocation(cfg.budget, kl_by_codec, low_spec, codecs, sim.hidden))
        if cfg.recipe is not None:
            from .recipes import write_recipe

            path = write_recipe(cfg.recipe, model=model, model_id=model_id, tp=cfg.tp, layers=choices[-1].specs,
                                feedback=cfg.feedback, rule=None, calibration=calibration)
            log(f"recipe of the allocation -> {path}")
    plans = [{n: codecs[c][n] for n, c in ch.specs.items()} for ch in choices]
    base, totals, _ = compare(model, sim, windows, [Plan(cfg.tp, plan, feedback=cfg.feedback) for plan in plans],
                              labels=[ch.label for ch in choices], log=log)
    env = environment()
    bits = [plan_bits(plan, sim.hidden) for plan in plans]
    runs = [(True, base, totals, [{}] * len(plans))]
    if cfg.real_ranks:
        runs.append((False, *_evaluate_real(cfg, model_id, windows, low_spec, choices, log)))
    records = []
    for simulated, run_base, run_totals, extra in runs:
        for ch, b, tot, more in zip(choices, bits, run_totals, extra):
            label = ch.label + (", feedback" if cfg.feedback else "")
            records.append(quality_record(model=model_id, text=windows.description, totals=tot, baseline=run_base,
                                          world_size=cfg.tp, simulated=simulated, codec=label, bits=b,
                                          calibration="none" if calibration is None else calibration.label(),
                                          **ch.fields, ranking_text=ranking_text, error_feedback=cfg.feedback,
                                          env=env, **more))
            log(summary_line(records[-1], f"TP={cfg.tp} {'sim' if simulated else 'real'} {label:60s}"))
    out = Path(cfg.out) if cfg.out else default_results_path(model_id)
    append_records(out, records)
    log(f"{len(records)} records -> {out}")
    return records


def _codec_maps(cfg: SensitivityConfig, layers, calibration) -> tuple[str, dict]:
    """(the low codec's canonical spec, {canonical spec: {layer name: codec}} for the low and
    every high codec): calibrated codecs differ per layer."""
    low_spec = str(parse_codec_spec(cfg.low))
    codecs = {low_spec: layer_codecs(low_spec, layers, calibration)}
    codecs.update({str(parse_codec_spec(h)): layer_codecs(h, layers, calibration) for h in cfg.high})
    return low_spec, codecs


def plan_from_record(cfg: SensitivityConfig, *, log=say) -> dict[str, str]:
    """The plan `run` would choose, from the KLs of the sensitivity record `cfg.from_record` (same
    model, TP size and feedback), without running the model; written as a recipe with `cfg.recipe`.
    Returns layer -> codec spec."""
    from .models import load_model
    from .sensitivity import plan_bits
    from .simtp import SimulatedTP

    model, _, model_id = load_model(cfg.model)
    sim = SimulatedTP(model)
    calibration = _calibration(cfg, model_id, sim.hidden)
    low_spec, codecs = _codec_maps(cfg, sim.layers, calibration)
    record = _read_ranking(cfg.from_record, model=model_id, tp=cfg.tp, layers=list(sim.layers), feedback=cfg.feedback)
    saved = record.get("kl_by_codec", {record["codec"]: record["kl"]})
    wanted = list(codecs) if cfg.allocate else [low_spec]
    missing = [c for c in wanted if c not in saved]
    if missing:
        raise ValueError(f"{cfg.from_record} has no KLs for {', '.join(missing)}; it has {', '.join(saved)}")
    kl_by_codec = {c: saved[c] for c in wanted}
    if cfg.allocate:
        choice = _allocation(cfg.budget, kl_by_codec, low_spec, codecs, sim.hidden)
    else:
        (choice,) = _promotions(cfg, kl_by_codec[low_spec], low_spec, codecs, sim.hidden)  # one, by the config's check
    bits = plan_bits({n: codecs[c][n] for n, c in choice.specs.items()}, sim.hidden)
    log(f"TP={cfg.tp} {choice.label}{', feedback' if cfg.feedback else ''}: {bits:.4f} bits/value "
        f"(KLs of {cfg.from_record})")
    log(json.dumps(choice.specs, indent=1))
    if cfg.recipe is not None:
        from .recipes import write_recipe

        path = write_recipe(cfg.recipe, model=model, model_id=model_id, tp=cfg.tp, layers=choice.specs,
                            feedback=cfg.feedback, rule=None, calibration=calibration)
        log(f"recipe -> {path}")
    return choice.specs


def _sensitivities(cfg: SensitivityConfig, model, sim, tok, model_id: str, codecs: dict, low: str, log) -> tuple:
    """({codec: {layer: single-layer KL}}, the text they were measured on) for every codec that
    needs them: --low (the ranking), and with --allocate every candidate. Taken from --ranking-in
    where it has them; the others are measured on the calibration text (the same windows)."""
    from .sensitivity import layer_sensitivity
    from .text import make_windows

    wanted = list(codecs) if cfg.allocate else [low]
    kl_by_codec, text = {}, None
    if cfg.ranking_in:
        ranking = _read_ranking(cfg.ranking_in, model=model_id, tp=cfg.tp, layers=list(sim.layers),
                                feedback=cfg.feedback)
        saved = ranking.get("kl_by_codec", {ranking["codec"]: ranking["kl"]})
        kl_by_codec = {c: kl for c, kl in saved.items() if c in wanted}
        text = ranking["text"]
    missing = [c for c in wanted if c not in kl_by_codec]
    if missing:
        cal = make_windows(tok, cfg.calib_text, seq_len=cfg.seq_len, windows=cfg.calib_windows)
        if text is not None and text != cal.description:
            raise ValueError(f"--ranking-in was measured on {text}, the codecs it lacks ({', '.join(missing)}) "
                             f"would be measured on {cal.description}")
        for c in missing:
            kl_by_codec[c] = layer_sensitivity(model, sim, cal, tp=cfg.tp, codecs=codecs[c], feedback=cfg.feedback,
                                               log=log)
        text = cal.description
    return kl_by_codec, text


@dataclass(frozen=True)
class _Choice:
    """One plan to evaluate: its label, each layer's codec spec, and its record's extra fields."""

    label: str
    specs: dict[str, str]
    fields: dict


def _by_kl(kl: dict[str, float]) -> dict[str, float]:
    return dict(sorted(kl.items(), key=lambda kv: -kv[1]))


def _evaluate_real(cfg: SensitivityConfig, model_id: str, windows, low: str, choices: list[_Choice], log) -> tuple:
    """(baseline, [Totals], [extra record fields]) of each plan on `cfg.tp` real gloo ranks: the
    deployed path, `low` as the codec and one override per layer on another codec."""
    from .models import model_folder
    from .realtp import RealPoint, evaluate_on_ranks

    points = [RealPoint(spec=low, overrides=tuple((n, c) for n, c in ch.specs.items() if c != low),
                        feedback=cfg.feedback, calibration=cfg.calibration) for ch in choices]
    base, totals, seconds, fallbacks = evaluate_on_ranks(model_folder(cfg.model), model_id, cfg.tp, windows, points,
                                                         log=log)
    return base, totals, [{"seconds": round(s, 1), "exact_fallback_calls": f} for s, f in zip(seconds, fallbacks)]


def _promotions(cfg: SensitivityConfig, sens, low: str, codecs: dict, hidden: int) -> list[_Choice]:
    """Every promotion plan: each --promote k with each --high codec, plus (without --allocate)
    the budget's k per codec; the uniform --low plan (k = 0, whatever the codec) once; no plan twice."""
    from .sensitivity import budget_promotions, most_sensitive

    chosen = []
    highs = [c for c in codecs if c != low] or [low]
    for high in highs:
        ks = list(cfg.promote)
        if cfg.budget is not None and not cfg.allocate:
            ks.append(budget_promotions(sens, codecs[low], codecs[high], hidden, cfg.budget))
        for k in ks:
            if k > len(sens):
                raise ValueError(f"--promote {k}: the model has {len(sens)} row-parallel layers")
            plan = (highs[0], 0) if k == 0 else (high, k)
            if plan not in chosen:
                chosen.append(plan)
    choices = []
    for high, k in chosen:
        top = most_sensitive(sens, k)
        specs = {n: high if n in top else low for n in sens}
        choices.append(_Choice(low if k == 0 else f"{low} + {k} layers {high}", specs,
                               {"plan_low": low, "plan_high": high, "layers_high": top}))
    return choices


def _allocation(budget: float, kl_by_codec: dict, low: str, codecs: dict, hidden: int) -> _Choice:
    """The plan `sensitivity.allocate` picks among the measured codecs within `budget`."""
    from .sensitivity import allocate, plan_bits

    specs = allocate(kl_by_codec, {c: plan_bits(codecs[c], hidden) for c in kl_by_codec}, budget)
    counts = ", ".join(f"{sum(v == c for v in specs.values())} layers {c}" for c in kl_by_codec
                       if c != low and c in specs.values())
    return _Choice(f"{low} + {counts}" if counts else low, specs,
                   {"plan_low": low, "layer_codecs": specs, "allocation_budget": budget})


def _calibration(cfg: SensitivityConfig, model_id: str, hidden: int):
    """The calibration file of the run (None without one), checked as the evaluation tool checks it."""
    if cfg.calibration is None:
        return None
    return load_for_evaluation(cfg.calibration, tp=cfg.tp, hidden=hidden, model=model_id,
                               eval_text=canonical_text_spec(cfg.text))


def _read_ranking(path: str, *, model: str, tp: int, layers: list[str], feedback: bool) -> dict:
    """A saved ranking, checked against this run. Its KLs are keyed by codec spec, so a run with
    another --low reuses those it has and measures the rest."""
    ranking = json.loads(Path(path).read_text())
    got = {k: ranking.get(k, False if k == "feedback" else None) for k in ("model", "tp", "feedback")}
    want = {"model": model, "tp": tp, "feedback": feedback}
    if got != want:
        raise ValueError(f"ranking {path} was made for {got}, this run is {want}")
    if sorted(ranking.get("kl", {})) != sorted(layers):
        raise ValueError(f"ranking {path} does not name this model's {len(layers)} row-parallel layers")
    return ranking


def parse_args(argv: list[str] | None = None) -> SensitivityConfig:
    ap = argparse.ArgumentParser(prog="tpcomp-sensitivity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, a Hugging Face folder or a .gguf file")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--low", default="fp4_e2m1/b32/e6m2")
    ap.add_argument("--high", nargs="+", default=["fp6_e2m3/b32/e8m0"], help="codec(s) of the promoted layers")
    ap.add_argument("--promote", type=int, nargs="+", help="layer counts to promote (default 0 2 4; with --budget: none)")
    ap.add_argument("--budget", type=float, help="bits per value: per --high codec, also the plan with the most layers within it")
    ap.add_argument("--allocate", action="store_true",
                    help="with --budget: one plan, each layer's codec chosen among --low and --high (least summed KL)")
    ap.add_argument("--calib-text", default="sotu-1901")
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--text", default="moby-dick")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--offset", type=int, default=0, help="first evaluation-text token used")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON Lines file to append to (default: quality_<model>_<cpu>_<date>.jsonl "
                    "in ~/.cache/tpcomp-megatron/results)")
    ap.add_argument("--ranking", help="write the per-layer ranking (JSON) here")
    ap.add_argument("--ranking-in", help="reuse the ranking of an earlier run (same model, --tp, --low)")
    ap.add_argument("--real-ranks", action="store_true",
                    help="also run every plan on --tp real gloo ranks, as deployed (per-layer overrides)")
    ap.add_argument("--calibration", help="calibration file (tpcomp-calibrate at --tp) for lowrank+ / outlier+ codecs")
    ap.add_argument("--error-feedback", action="store_true",
                    help="rank and run the plans with error feedback (deploy with --tp-comm-error-feedback)")
    ap.add_argument("--recipe", help="with --allocate or --from-record: write the plan as a recipe file (--tp-comm-recipe)")
    ap.add_argument("--from-record", metavar="FILE.json",
                    help="make one plan from a sensitivity record's KLs (a --ranking file) without running the model")
    ap.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    a = ap.parse_args(argv)
    promote = tuple(a.promote) if a.promote is not None else () if a.budget is not None else (0, 2, 4)
    return SensitivityConfig(model=a.model, tp=a.tp, low=a.low, high=tuple(a.high), promote=promote, budget=a.budget,
                             allocate=a.allocate,
                             calib_text=a.calib_text, calib_windows=a.calib_windows, text=a.text, windows=a.windows,
                             seq_len=a.seq_len, offset=a.offset, threads=a.threads, out=a.out, ranking=a.ranking,
                             ranking_in=a.ranking_in, real_ranks=a.real_ranks, feedback=a.error_feedback,
                             calibration=a.calibration, recipe=a.recipe, from_record=a.from_record)


def main(argv: list[str] | None = None) -> int:
    from ..inference.finite import NonFiniteLogits

    try:
        cfg = parse_args(argv)
        bad = nonfinite_summary(run(cfg))
    except (ValueError, NonFiniteLogits) as e:
        raise SystemExit(f"tpcomp-sensitivity: error: {e}") from None
    if bad:
        raise SystemExit(f"tpcomp-sensitivity: error: {bad}")
    return 0
