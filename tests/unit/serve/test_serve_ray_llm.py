"""serve/ray_llm.py holds every name serve/ takes from Ray's internal `ray.llm._internal`: read here without
importing it (it imports vLLM), checked against the installed Ray, and no other serve/ module imports them.

    .venv/bin/python -m pytest tests/unit/serve/test_serve_ray_llm.py -q
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parents[3] / "serve"
RAY_LLM = SERVE / "ray_llm.py"
INTERNAL = "ray.llm._internal"


def written_against() -> tuple[str, dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """ray_llm.py's RAY_VERSION, its imports (module -> names) and OVERRIDDEN (class path -> methods)."""
    tree = ast.parse(RAY_LLM.read_text())
    imports: dict[str, tuple[str, ...]] = {}
    consts: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray."):
            imports[node.module] = imports.get(node.module, ()) + tuple(a.name for a in node.names)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("RAY_VERSION", "OVERRIDDEN"):
                consts[node.targets[0].id] = ast.literal_eval(node.value)
    return consts["RAY_VERSION"], imports, consts["OVERRIDDEN"]  # type: ignore[return-value]


def missing(imports: dict[str, tuple[str, ...]], overridden: dict[str, tuple[str, ...]]) -> list[str]:
    """The names (module.name) that no longer import, and the overridden methods (Class.method) that are gone."""
    gone = []
    for module, names in imports.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            gone += [f"{module}.{n}" for n in names]
            continue
        gone += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
    for path, methods in overridden.items():
        module, _, cls_name = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            gone.append(path)
            continue
        gone += [f"{path}.{m}" for m in methods if not hasattr(cls, m)]
    return gone


def advice(installed: str, written: str, gone: list[str]) -> str:
    return (
        f"Ray {installed} is installed; serve/ray_llm.py was written against Ray {written}, and these no longer "
        f"import or exist: {', '.join(gone)}.\n"
        "What to do: find where this Ray keeps each name (grep -rn 'def NAME\\|class NAME\\|^NAME =' in the "
        "installed ray/llm/ and ray/serve/llm/; prefer a public ray.serve.llm path where one exists), change its "
        "import in serve/ray_llm.py only (no other serve/ module imports ray.llm._internal), check that its "
        "signature and behaviour still fit where serve/ uses it (grep -n NAME serve/*.py: the ingress's stream "
        "helpers, the engine replica's LoRA loader, the overridden LLMServer/OpenAiIngress methods), then set "
        f"RAY_VERSION = \"{installed}\" and run tests/integration/test_serve.py.")


def test_the_internal_names_import_from_the_installed_ray():
    """Pass at once on the Ray ray_llm.py was written against; on another, every name must still import."""
    import ray

    written, imports, overridden = written_against()
    assert any(m.startswith(INTERNAL) for m in imports) and overridden
    if ray.__version__ == written:
        return
    gone = missing(imports, overridden)
    assert not gone, advice(ray.__version__, written, gone)


def test_a_moved_name_is_reported_with_what_to_do():
    gone = missing({"json": ("dumps", "no_such_name"), "no_such_module": ("X",)},
                   {"json:JSONDecoder": ("decode", "no_such_method"), "json:NoSuchClass": ("f",)})
    assert gone == ["json.no_such_name", "no_such_module.X", "json:JSONDecoder.no_such_method",
                    "json:NoSuchClass"]
    text = advice("9.9.9", "2.60.0", gone)
    assert "json.no_such_name" in text and "serve/ray_llm.py" in text and 'RAY_VERSION = "9.9.9"' in text


def test_ray_llm_states_the_version_it_was_written_against():
    written, _, _ = written_against()
    assert written == "2.60.0" and f"Ray {written}" in RAY_LLM.read_text()


@pytest.mark.parametrize("path", sorted(p.name for p in SERVE.glob("*.py") if p.name != "ray_llm.py"))
def test_no_other_serve_module_imports_ray_internals(path):
    tree = ast.parse((SERVE / path).read_text())
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(INTERNAL):
            modules = [node.value]  # importlib.import_module("ray.llm._internal...")
        bad = [m for m in modules if m == INTERNAL or m.startswith(INTERNAL + ".")]
        assert not bad, f"serve/{path}:{node.lineno} imports {bad[0]}: import it through serve/ray_llm.py"
