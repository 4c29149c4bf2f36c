"""The runtime imports nothing from the evaluation and research code, nor the `tools` extra's
packages: a fresh interpreter with those modules blocked imports every runtime module."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESEARCH = ["tpcomp_megatron.quality", "tools", "matplotlib", "gguf", "accelerate", "sentencepiece"]
RUNTIME = ["tpcomp_megatron.codecs", "tpcomp_megatron.comm", "tpcomp_megatron.comm.reduce", "tpcomp_megatron.megatron",
           "tpcomp_megatron.models", "tpcomp_megatron.convert", "tpcomp_megatron.inference.loop",
           "tpcomp_megatron.recipe", "tpcomp_megatron.calibration", "tpcomp_megatron.args", "tpcomp_megatron.ops",
           "tpcomp_megatron.quiet"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_runtime_imports_with_research_blocked():
    proc = _run(f"""
        import importlib, sys
        for name in {RESEARCH!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
        for name in {RUNTIME!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.startswith("tpcomp_megatron.quality") and sys.modules[m] is not None)
        print("loaded research:", loaded)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded research: []" in proc.stdout


def test_the_block_works():
    """The guard itself: a blocked research module cannot be imported (else the test above proves nothing)."""
    proc = _run("""
        import sys
        sys.modules["tpcomp_megatron.quality"] = None
        import tpcomp_megatron.quality.sweep
    """)
    assert proc.returncode != 0 and ("ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr)
