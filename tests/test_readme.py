"""No dead references: every file the README names in backticks exists (or, for a glob, matches),
and setup.py ships only files that exist."""

import glob
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHERE = (ROOT, ROOT / "benchmarks" / "results", ROOT / "tpcomp_megatron")
FILE = re.compile(r"^[\w./*{},-]+\.(md|py|sh|json|jsonl|png)$")


def _expand(name: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", name)
    if m is None:
        return [name]
    return [x for alt in m.group(1).split(",") for x in _expand(name[:m.start()] + alt + name[m.end():])]


def _exists(name: str) -> bool:
    return any(glob.glob(str(base / name)) for base in WHERE)


def test_readme_names_only_files_that_exist():
    names = [n for n in re.findall(r"`([^`\n]+)`", (ROOT / "README.md").read_text()) if FILE.match(n)]
    assert len(names) > 20  # the check sees the README's references
    dead = [n for n in names for x in _expand(n) if not _exists(x)]
    assert not dead, f"README names files that do not exist: {sorted(set(dead))}"


def test_setup_ships_only_existing_files():
    text = (ROOT / "setup.py").read_text()
    for package, patterns in re.findall(r'"(tpcomp_megatron[\w.]*)": \[([^\]]*)\]', text):
        for pattern in re.findall(r'"([^"]+)"', patterns):
            if not any(c in pattern for c in "*?["):  # a named file must exist; a glob ships what exists
                assert (ROOT / package.replace(".", "/") / pattern).exists(), (package, pattern)
