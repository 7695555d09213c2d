"""The house rules of ../shared/DESIGN.md §2, read from the code itself (ast, nothing imported):

- no import circles among our modules (function-local imports included: they hide circles, not break them);
- imports go down the package table: pipelines ← tune / serve ← cluster, with serve reading only
  pipelines.artifacts and pipelines.schema; inside pipelines the wings go schema ← demo ← artifacts ← data ←
  train ← eval ← export (a wing imports only wings to its left);
- our own light modules are imported at module top, so the graph is visible; the only function-local imports
  of ours left are the heavy serving modules (Ray Serve, vLLM, FastAPI at import time) and serve/__init__'s
  lazy attributes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "tune", "serve", "cluster")
WINGS = ("schema", "demo", "artifacts", "data", "train", "eval", "export")
# Modules that import Ray Serve / vLLM / FastAPI at import time: the CLI loads them inside the command that serves.
HEAVY = {"serve.app", "serve.ingress", "serve.server", "serve.vllm_cpu_lora"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, at module top) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports pkg.mod when that is a module of ours, else names from pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                out.append((name, node.lineno, id(node) in top))
    return out


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    return {m: {t for t, _, _ in imports(p, known) if t != m} for m, p in modules.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violation(src: str, dst: str) -> str | None:
    """Why `src` may not import `dst`, or None when it may."""
    s_pkg, d_pkg = src.split(".")[0], dst.split(".")[0]
    allowed = {"pipelines": {"pipelines"}, "tune": {"pipelines", "tune"}, "serve": {"pipelines", "serve"},
               "cluster": set(PACKAGES)}
    if d_pkg not in allowed[s_pkg]:
        return f"{s_pkg} may not import {d_pkg}"
    if s_pkg == "serve" and d_pkg == "pipelines" and not dst.startswith(("pipelines.artifacts", "pipelines.schema")):
        return "serve reads only pipelines.artifacts and pipelines.schema"
    if s_pkg == d_pkg == "pipelines":
        s_wing, d_wing = (src.split(".") + [""])[1], (dst.split(".") + [""])[1]
        if s_wing in WINGS and d_wing in WINGS and WINGS.index(d_wing) > WINGS.index(s_wing):
            return f"pipelines.{s_wing} may not import pipelines.{d_wing} (wings import only those below them)"
    return None


def test_circle_detector_finds_a_planted_circle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(planted) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = circles(graph(our_modules()))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_go_down_the_package_table():
    bad = [f"{src} -> {dst}: {why}" for src, targets in graph(our_modules()).items() for dst in sorted(targets)
           if (why := violation(src, dst))]
    assert not bad, "\n".join(bad)


def test_order_checker_refuses_upward_imports():
    assert violation("pipelines.data.curate", "cluster.config")
    assert violation("serve.app", "pipelines.train.sft")
    assert violation("pipelines.data.tokenize", "pipelines.train.config")
    assert violation("pipelines.train.sft", "pipelines.data.chat") is None
    assert violation("cluster.stages", "serve.app") is None


def test_own_light_modules_are_imported_at_module_top():
    modules = our_modules()
    known = set(modules)
    local = [f"{m}:{line} imports {t} inside a function" for m, p in modules.items()
             for t, line, at_top in imports(p, known)
             if not at_top and t not in HEAVY and m != "serve"]  # serve/__init__: lazy attributes, by design
    assert not local, "\n".join(local)


@pytest.mark.parametrize("module", ["pipelines.eval.metrics", "pipelines.data.packing", "pipelines.train.losses",
                                    "pipelines.data.dedup", "cluster.config"])
def test_pure_modules_import_without_ray_or_vllm(module):
    import subprocess
    import sys

    code = (f"import sys, {module}; bad = [m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# A stage is one entry of cluster/stages.py: elsewhere in cluster/ it is reached through that entry (stages.SFT,
# stage.name), never by its name string. config.py and plan*.py are left out: they name config sections, which
# share their words with stages (data, dpo, tune, merge, quantize, serve, gate).
SECTION_FILES = {"config.py", "plan.py", "plan_shape.py", "plan_render.py"}


def stage_name_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every string constant in the source that is a stage's name (docstrings are text, not
    references, and are left out)."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names and id(n) not in docs]


def stage_names() -> set[str]:
    tree = ast.parse((ROOT / "cluster" / "stages.py").read_text())
    return {c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") ==
            "Stage" and c.args and isinstance(c.args[0], ast.Constant)}


def test_a_stage_is_named_only_in_the_stage_table():
    names = stage_names()
    assert {"data", "sft", "dpo", "tune", "evaluate", "gate", "merge", "quantize", "serve", "demo"} <= names
    found = [f"{p.relative_to(ROOT)}:{line} {name!r}" for p in sorted((ROOT / "cluster").glob("*.py"))
             if p.name not in SECTION_FILES | {"stages.py"}
             for line, name in stage_name_literals(p.read_text(), names)]
    assert not found, "stage names outside cluster/stages.py (use the table's entry):\n" + "\n".join(found)


def test_stage_name_checker_sees_a_name_string():
    assert stage_name_literals('x = cfg.stage_dir("sft")\n', {"sft"}) == [(1, "sft")]
    assert stage_name_literals('def f():\n    """sft"""\n    return stages.SFT.name\n', {"sft"}) == []


def test_unit_tests_are_laid_out_like_the_wings():
    """tests/unit/<wing>/ holds a wing's or package's tests; the house-wide ones (layout, locks, fallbacks, user
    errors, the repository's test data) stay at the top."""
    folders = {p.parent.name for p in (ROOT / "tests" / "unit").rglob("test_*.py")} - {"unit"}
    assert folders <= set(WINGS) | set(PACKAGES), folders
    top = {p.stem for p in (ROOT / "tests" / "unit").glob("test_*.py")}
    assert top <= {"test_layout", "test_locks", "test_fallbacks", "test_user_errors", "test_repo_data"}, top


def _unresolved_imports(path: Path) -> list[str]:
    """`from <our package> import name` / `import <our module>` in a file (at any depth) that does not resolve."""
    import importlib
    import importlib.util

    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in PACKAGES + ("bench", "tests"):
            if importlib.util.find_spec(node.module) is None:
                missing.append(f"{path.name}:{node.lineno} {node.module}")
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and not (
                        hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")):
                    missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES and importlib.util.find_spec(alias.name) is None:
                    missing.append(f"{path.name}:{node.lineno} {alias.name}")
    return missing


@pytest.mark.parametrize("folder", ["bench", "tests"])
def test_scripts_import_what_exists(folder):
    """Bench scripts and tests import only modules and names the packages still have (a module moved or deleted
    breaks them where no test runs them)."""
    missing = [m for f in sorted((ROOT / folder).rglob("*.py")) for m in _unresolved_imports(f)]
    assert not missing, f"imports of what no longer exists: {missing}"


def test_import_checker_sees_a_deleted_module(tmp_path):
    planted = tmp_path / "old_bench.py"
    planted.write_text("def f():\n    from cluster.runner import init_ray\n"
                       "    from cluster.session import nothing_here\n")
    assert _unresolved_imports(planted) == ["old_bench.py:2 cluster.runner",
                                            "old_bench.py:3 cluster.session.nothing_here"]


def test_stage_runs_take_typed_sections_and_locations():
    """Every stage's run function takes at most six parameters (the typed sections, a TrainSetup, Locations):
    no stage input travels as a local path and a store URI side by side."""
    import inspect

    from pipelines.data import tokenize
    from pipelines.eval import evaluate
    from pipelines.export import merge, quantize
    from pipelines.train import dpo, sft
    from tune import sweep

    runs = {"data": tokenize.run, "sft": sft.run, "dpo.prepare": dpo.prepare, "dpo": dpo.run, "tune": sweep.run,
            "evaluate": evaluate.run, "merge": merge.run, "quantize": quantize.run}
    for name, fn in runs.items():
        params = inspect.signature(fn).parameters
        assert len(params) <= 6, f"{name}: {list(params)}"
        assert not [p for p in params if p.endswith("_uri")], f"{name}: {list(params)}"
