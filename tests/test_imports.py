"""The package's import rule (docs/architecture.md): imports run one way, with no cycle, not even through imports
inside functions; the readers of logs (report, monitor) never import the sweep; no module reaches into another's
private names; the small shared modules import without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "sftbench"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, function-level ones included."""
    mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
    pkg = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from sftbench import runlog` imports the module sftbench.runlog
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found += [(s, []) for s in subs] + [(base, [n for n in names if f"{base}.{n}" not in MODULES])]
    return [(m, n) for m, n in found if m.startswith("sftbench")]


def _graph() -> dict[str, set[str]]:
    g = {}
    for mod, path in MODULES.items():
        g[mod] = {m for m, _ in _imports(path) if m in MODULES and m != mod and not mod.startswith(m + ".")}
    return g


def test_no_import_cycle_in_the_package():
    g = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_log_readers_never_import_the_sweep():
    g = _graph()

    def reach(m: str, seen: set[str]) -> set[str]:
        for n in g[m]:
            if n not in seen:
                seen.add(n)
                reach(n, seen)
        return seen

    for reader in [m for m in MODULES if m.startswith(("sftbench.report", "sftbench.monitor"))]:
        assert "sftbench.sweep" not in reach(reader, set()), reader


def test_report_modules_import_one_way():
    """Inside sftbench.report: runs <- tables <- writers / plot <- cli; each imports only modules before it."""
    order = ["runs", "tables", "writers", "plot", "cli"]
    g = _graph()
    for i, name in enumerate(order):
        mine = {m.rsplit(".", 1)[1] for m in g[f"sftbench.report.{name}"] if m.startswith("sftbench.report.")}
        allowed = set(order[:i]) - ({"writers"} if name == "plot" else set())
        assert mine <= allowed, (name, mine - allowed)


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sftbench"):
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    if target in MODULES:
                        aliases[a.asname or a.name] = target
                    elif a.name.startswith("_"):
                        bad.append(f"{mod} imports {node.module}.{a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{mod} uses {aliases[node.value.id]}.{node.attr}")
    assert bad == []


@pytest.mark.parametrize("mod", ["sftbench.runlog", "sftbench.presets", "sftbench.reference", "sftbench.memory",
                                 "sftbench.dsconfig", "sftbench.args", "sftbench.speed", "sftbench.graphs",
                                 "sftbench.engine_checks", "sftbench.metrics", "sftbench.repredict", "sftbench.report",
                                 "sftbench.report.runs", "sftbench.report.tables", "sftbench.report.writers",
                                 "sftbench.report.plot", "sftbench.report.cli", "sftbench.sweep", "sftbench.plan",
                                 "sftbench.hardware", "sftbench.benchset", "sftbench.failures",
                                 "sftbench.liveness", "sftbench.checkpoint", "sftbench.monitor.state",
                                 "sftbench.monitor.rows", "sftbench.monitor.table", "sftbench.nodes",
                                 "sftbench.fmt", "sftbench.paths", "sftbench.models", "sftbench.models.spec",
                                 "sftbench.models.shape", "sftbench.models.resolve", "sftbench.models.pangu",
                                 "sftbench.models.hf", "sftbench.levers", "sftbench.ds_patches"])
def test_shared_modules_import_without_torch(mod):
    code = f"import sys, {mod}; sys.exit(1 if 'torch' in sys.modules or 'deepspeed' in sys.modules else 0)"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{mod} imports torch or deepspeed at import time\n{p.stderr[-2000:]}"


def test_each_shared_fact_and_helper_has_one_home():
    """The repository root, the MiB, the median and every number formatter are defined in one module each
    (sftbench/paths.py, sftbench/fmt.py, sftbench/metrics.py); everything else imports them."""
    files = [*MODULES.values(), *sorted((REPO / "bench").glob("*.py")), REPO / "train.py", REPO / "monitor.py"]
    homes: dict[str, list[str]] = {}
    for path in files:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
            for n in names:
                if n in ("REPO", "ROOT", "REPO_ROOT", "MIB", "median", "percentile") or n.startswith("fmt_"):
                    homes.setdefault(n, []).append(str(path.relative_to(REPO)))
    assert {n: h for n, h in homes.items() if len(h) > 1} == {}
    assert homes["REPO"] == ["sftbench/paths.py"] and homes["MIB"] == ["sftbench/fmt.py"]
    assert homes["median"] == ["sftbench/metrics.py"]
