"""The package's layering, drawn from its imports (tools/import_graph.py): no import cycle
anywhere, between modules or between packages (a package's modules and its `__init__` taken as
one, a top-level module alone: no arrow runs back up); the runtime (what a serving process imports: codecs, kernels, ops, comm, megatron)
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


def test_no_cycle_between_packages():
    tool = _tool()
    graph = tool.import_graph()
    modules = set(graph)

    def package(m: str) -> str:  # a package's __init__ is its own module name; a top-level module is its own
        parent = m.rsplit(".", 1)[0]
        return m if parent == "tpcomp_megatron" or any(o.startswith(m + ".") for o in modules) else parent

    rooms: dict = {}
    for m, ts in graph.items():
        rooms.setdefault(package(m), set()).update(package(t) for t in ts if package(t) != package(m))
    assert len(rooms) > 10  # the check sees the packages
    assert [c for c in tool.strongly_connected(rooms) if len(c) > 1] == []
    assert [c for c in tool.strongly_connected({"a": {"b"}, "b": {"a"}}) if len(c) > 1]  # and would see one


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
