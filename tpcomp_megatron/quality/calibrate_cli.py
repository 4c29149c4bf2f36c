"""`tpcomp-calibrate`: partial-sum statistics and outlier channels for a model at TP=N.

    tpcomp-calibrate --model smollm2-135m --tp 2 4 8 --text sotu-1901 --tokens 2048 \\
        --output calibration/smollm2-135m_tp{tp}.safetensors

Runs the calibration text through the model at each TP size, simulated in one process (default;
exactly the partial sums Megatron's ranks form, head-aligned) or on real gloo ranks with the
converted Megatron model (`--real-ranks`), collects per-layer, per-rank, per-channel min/max of the
row-parallel partial sums (and of the reduced sum) and a sketch of their leading directions,
selects k = ceil(hidden / ratio) outlier channels per layer with `--rule` and the bases of the
low-rank codecs (`lowrank+...`, up to rank `--directions`, default 64, at most 128), and writes a calibration file (safetensors + JSON
metadata: model, TP size, layer names, codec, text). The statistics serve every rule, ratio and
rank: the evaluation re-selects channels from them when asked for another.

With `--recipe PATH --recipe-codec POINT` it also writes a recipe (recipe.py): every layer on
that codec (runtime grammar, e.g. `outlier+fp4_e2m1/b32/e8m0/k64:feedback=on`), with only the
calibration data it needs, deployable as `--tp-comm-recipe PATH`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import RULES, SKETCH_ROWS, Calibration, save_calibration
from ..codecs import parse_point
from ..codecs.spec import MAX_RANK
from ..console import say
from ..quiet import VERBOSE_HELP


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig:
    """What to calibrate and where to write it."""

    model: str
    """Known model name (smollm2-135m, gemma3-270m) or a Hugging Face folder."""
    tp: tuple[int, ...]
    """TP sizes; one file each."""
    output: str
    """Output path; must contain '{tp}' when several TP sizes are given."""
    text: str = "sotu-1901"
    """Calibration text spec (never the evaluation text)."""
    tokens: int = 2048
    """Calibration tokens (a multiple of seq_len)."""
    seq_len: int = 512
    """Tokens per forward."""
    ratio: int = 64
    """One outlier channel per `ratio` channels."""
    rule: str = "range_sum"
    """Outlier selection rule: range_sum (arXiv 2411.07942), absmax_max, range_sq_sum."""
    real_ranks: bool = False
    """Collect on real gloo ranks (converted Megatron model) instead of simulated TP."""
    threads: int = 1
    """torch threads for the simulated run (the machine is shared)."""
    directions: int = SKETCH_ROWS
    """Low-rank directions kept per source and layer: the largest rank the file serves."""
    recipe: str | None = None
    """Also write a recipe here ('{tp}' replaced by the TP size) with every layer on `recipe_codec`."""
    recipe_codec: str | None = None
    """The recipe's codec, `SPEC[:rule=RULE][:feedback=on]` (codecs/point.py)."""

    def __post_init__(self) -> None:
        if not self.tp or any(not isinstance(t, int) or t < 2 for t in self.tp):
            raise ValueError(f"--tp needs TP sizes >= 2, got {list(self.tp)}")
        if len(set(self.tp)) > 1 and "{tp}" not in self.output:
            raise ValueError("with several --tp sizes, --output must contain '{tp}' (one file per TP size)")
        if self.seq_len < 2 or self.tokens < self.seq_len or self.tokens % self.seq_len:
            raise ValueError(f"--tokens ({self.tokens}) must be a positive multiple of --seq-len ({self.seq_len})")
        if self.rule not in RULES:
            raise ValueError(f"--rule {self.rule!r}: choose one of {list(RULES)}")
        if self.ratio < 2:
            raise ValueError(f"--ratio must be >= 2, got {self.ratio}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if (self.recipe is None) != (self.recipe_codec is None):
            raise ValueError("--recipe and --recipe-codec go together (the recipe's file and its codec)")
        if self.recipe is not None:
            point = parse_point(self.recipe_codec)
            if point.spec is None or point.algorithm is not None:
                raise ValueError(f"--recipe-codec {self.recipe_codec!r}: a codec, optionally with :rule= and "
                                 ":feedback= (the algorithm is the deployment's choice)")
            if len(set(self.tp)) > 1 and "{tp}" not in self.recipe:
                raise ValueError("with several --tp sizes, --recipe must contain '{tp}' (one file per TP size)")
        if not 1 <= self.directions <= MAX_RANK:
            raise ValueError(f"--directions must be in [1, {MAX_RANK}] (the largest low-rank rank), got {self.directions}")

    def path(self, tp: int) -> Path:
        return Path(self.output.replace("{tp}", str(tp)))


def collect_simulated(model, windows, tp: int, directions: int = SKETCH_ROWS):
    from .calib import PartialSumStats
    from .simtp import SimulatedTP

    sim = SimulatedTP(model)
    stats = PartialSumStats(directions)
    try:
        with torch.no_grad(), sim.session(tp=tp, observer=stats):
            for i in range(windows.inputs.shape[0]):
                model(windows.inputs[i:i + 1])
    finally:
        sim.remove()
    return stats


def collect_real(hf_folder: Path, model_id: str, windows, tp: int, directions: int = SKETCH_ROWS):
    from ..testing import run_ranks
    from .calib import PartialSumStats
    from .realtp import convert_checkpoint, rank_statistics

    ckpt = convert_checkpoint(hf_folder, tp, model_id=model_id)
    per_rank = run_ranks(rank_statistics, tp, str(ckpt), windows, directions, timeout_s=3600, pg_timeout_s=600)
    stats = PartialSumStats(directions)
    for name in per_rank[0]:
        lo = torch.stack([r[name][0] for r in per_rank] + [per_rank[0][name][2]])
        hi = torch.stack([r[name][1] for r in per_rank] + [per_rank[0][name][3]])
        stats.update(name, lo, hi)
        stats.set_sketch(name, torch.cat([r[name][4] for r in per_rank] + [per_rank[0][name][5]]))
    return stats


def calibrate(cfg: CalibrateConfig, *, log=say) -> list[Path]:
    from .calib import build_calibration
    from .models import load_model, model_folder
    from .text import make_windows

    torch.set_num_threads(cfg.threads)
    model, tok, model_id = load_model(cfg.model)
    windows = make_windows(tok, cfg.text, seq_len=cfg.seq_len, windows=cfg.tokens // cfg.seq_len)
    written = []
    layers, hidden = 2 * model.config.num_hidden_layers, model.config.hidden_size  # linear_proj and linear_fc2
    for tp in cfg.tp:
        log(expected_size(tp, layers, hidden, cfg.directions))
    for tp in cfg.tp:
        t0 = time.perf_counter()
        if cfg.real_ranks:
            folder = model_folder(cfg.model)
            stats = collect_real(folder, model_id, windows, tp, cfg.directions)
        else:
            stats = collect_simulated(model, windows, tp, cfg.directions)
        cal = build_calibration(stats.as_dict(), bases=stats.bases(), model=model_id, tp=tp, ratio=cfg.ratio, rule=cfg.rule, tokens=cfg.tokens, text=windows.description,
                                source="real_ranks" if cfg.real_ranks else "simulated")
        path = cfg.path(tp)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_calibration(str(path), cal)
        written.append(path)
        log(f"TP={tp}: {len(cal.stats)} layers, k={next(iter(cal.channels.values())).numel()} channels ({cfg.rule}), "
            f"{time.perf_counter() - t0:.0f} s -> {path}")
        log(summarize(cal))
        if cfg.recipe is not None:
            written.append(_write_recipe(cfg, tp, model, model_id, cal))
            log(f"TP={tp}: recipe ({cfg.recipe_codec}) -> {written[-1]}")
    return written


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def expected_size(tp: int, layers: int, hidden: int, directions: int) -> str:
    """What a calibration file at `tp` will weigh, and why, said before the run."""
    sources = tp + 1
    per_direction = layers * sources * hidden * 4
    minmax = 2 * per_direction
    total = minmax + directions * per_direction
    return (f"TP={tp}: the calibration file will be about {_size(total)}: {layers} layers x {sources} sources "
            f"({tp} ranks and their sum) x {hidden} channels x (min and max + {directions} low-rank directions), "
            f"float32. Only lowrank+ codecs read the directions ({_size(directions * per_direction)}); "
            f"--directions N keeps fewer (the largest rank served), and a recipe (--recipe) keeps only what its "
            f"codec needs")


def _write_recipe(cfg: CalibrateConfig, tp: int, model, model_id: str, cal: Calibration) -> Path:
    from .recipes import write_recipe

    point = parse_point(cfg.recipe_codec)
    return write_recipe(cfg.recipe.replace("{tp}", str(tp)), model=model, model_id=model_id, tp=tp,
                        layers={name: str(point.spec) for name in cal.stats}, feedback=bool(point.feedback),
                        rule=point.rule, calibration=cal)


def summarize(cal: Calibration, layers: int = 2) -> str:
    """A few layers' channels and how much the rules agree (selection overlap)."""
    lines = []
    others = {r: cal.reselect(rule=r) for r in RULES if r != cal.meta["rule"]}
    for name in list(cal.channels)[:layers]:
        lines.append(f"  {name}: {cal.channels[name].tolist()}")
    for r, other in others.items():
        same = sum(len(set(cal.channels[n].tolist()) & set(other.channels[n].tolist())) for n in cal.channels)
        total = sum(cal.channels[n].numel() for n in cal.channels)
        lines.append(f"  overlap with rule {r}: {same}/{total} channels")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> CalibrateConfig:
    ap = argparse.ArgumentParser(prog="tpcomp-calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, a Hugging Face folder or a .gguf file")
    ap.add_argument("--tp", type=int, nargs="+", required=True)
    ap.add_argument("--output", required=True, help="file path; '{tp}' is replaced by the TP size")
    ap.add_argument("--text", default="sotu-1901", help="text spec: alias, stdlib:<path> or file:<path>")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ratio", type=int, default=64)
    ap.add_argument("--rule", default="range_sum", choices=RULES)
    ap.add_argument("--real-ranks", action="store_true", help="collect on real gloo ranks (Megatron model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--directions", type=int, default=SKETCH_ROWS,
                    help="low-rank directions kept per source and layer (the largest lowrank+ rank served)")
    ap.add_argument("--recipe", help="also write a recipe file here ('{tp}' is replaced by the TP size)")
    ap.add_argument("--recipe-codec", metavar="POINT", help="the recipe's codec for every layer, "
                    "SPEC[:rule=RULE][:feedback=on], e.g. lowrank+fp4_e2m1/b32/e6m2/r4:feedback=on")
    ap.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    a = ap.parse_args(argv)
    return CalibrateConfig(model=a.model, tp=tuple(a.tp), output=a.output, text=a.text, tokens=a.tokens,
                           seq_len=a.seq_len, ratio=a.ratio, rule=a.rule, real_ranks=a.real_ranks, threads=a.threads,
                           directions=a.directions, recipe=a.recipe, recipe_codec=a.recipe_codec)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        calibrate(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tpcomp-calibrate: error: {e}", file=sys.stderr)
        return 2
    return 0
