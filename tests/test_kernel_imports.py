"""The kernel modules import each other in layers, with no circle: every import statement of
tpcomp_megatron/kernels/ and tpcomp_megatron/ops.py (module level or inside a function, read by
tools/import_graph.py) draws no cycle, and the plans never reach back into the public front."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K = "tpcomp_megatron.kernels"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circle_in_the_kernels_and_ops():
    tool = _tool()
    graph = tool.import_graph()
    members = {m for m in graph if m == K or m.startswith(K + ".")} | {"tpcomp_megatron.ops"}
    assert {f"{K}.api", f"{K}.plans", f"{K}.steps", f"{K}.launch"} <= members
    assert tool.cycles(tool.restrict_to(graph, members)) == []


def test_layers():
    """plans and steps build from lower modules only (not the front, api.py); the launch code
    imports no other kernel module; the kernels never import the dispatcher (ops.py), which
    imports them."""
    graph = _tool().import_graph()
    assert f"{K}.api" not in graph[f"{K}.plans"] | graph[f"{K}.steps"]
    assert f"{K}.plans" not in graph[f"{K}.steps"]
    assert not {m for m in graph[f"{K}.launch"] if m.startswith(K)}
    assert all("tpcomp_megatron.ops" not in deps for mod, deps in graph.items() if mod.startswith(K))
