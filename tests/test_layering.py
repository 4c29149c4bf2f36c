"""The package's layering, drawn from its imports (tools/import_graph.py): no import cycle
anywhere; the runtime (what a serving process imports: codecs, kernels, ops, comm, megatron)
imports no tool (tune/, quality/, convert/); the gate (comm/gate/) sits below the collectives it
decides for and imports none of them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("tpcomp_megatron.codecs", "tpcomp_megatron.kernels", "tpcomp_megatron.ops", "tpcomp_megatron.comm",
           "tpcomp_megatron.megatron")
TOOLS = ("tpcomp_megatron.tune", "tpcomp_megatron.quality", "tpcomp_megatron.convert")


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _under(name: str, prefixes: tuple) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycle_in_the_package(capsys):
    assert _tool().main(["--cycles", "tpcomp_megatron"]) == 0, capsys.readouterr().out


def test_the_runtime_imports_no_tool():
    graph = _tool().import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if _under(m, RUNTIME) for t in ts if _under(t, TOOLS))
    assert not bad, bad


def test_the_gate_imports_nothing_above_it():
    graph = _tool().import_graph()
    gate = "tpcomp_megatron.comm.gate"
    assert any(_under(m, (gate,)) for m in graph)  # the check sees the gate's modules
    bad = sorted((m, t) for m, ts in graph.items() if _under(m, (gate,)) for t in ts
                 if _under(t, ("tpcomp_megatron.comm",)) and not _under(t, (gate,)))
    assert not bad, bad
