"""The package layout keeps Python's standard `platform` module reachable (docs/concepts/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_platform_folder() -> None:
    assert not (ROOT / "platform").exists()
    assert not (ROOT / "platform.py").exists()


def test_import_platform_from_repo_root_is_stdlib() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import platform, sys; print(platform.__file__); print(platform.system())"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    module_file = Path(out[0]).resolve()
    assert ROOT not in module_file.parents
    assert out[1] in {"Linux", "Darwin", "Windows"}


def test_core_subpackage_imports_without_ray() -> None:
    code = "import sys, sflam.platform.local, sflam.pipelines.train; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _imports(path: Path, package: str) -> set[str]:
    """The sflam modules a module imports, at any depth of its code (a function-level import counts too)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join([*package.split(".")[: -node.level + 1], node.module])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        found.update(name for name in names if name.startswith("sflam"))
    return found


def test_the_package_has_no_import_cycle() -> None:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "sflam").rglob("*.py")}
    graph = {name: {m for m in _imports(path, name) if m in modules and m != name and not name.startswith(m + ".")}
             for name, path in modules.items()}
    # a package's __init__ importing its own modules is how a package exposes them, not a cycle
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_every_module_has_its_row_in_the_docs_module_map() -> None:
    """docs/concepts/architecture.md names the module that holds each concept: a new module gets its row."""
    text = (ROOT / "docs" / "concepts" / "architecture.md").read_text()
    rows = text.split("## The module map", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in sorted((ROOT / "sflam").rglob("*.py")):
        relative = path.relative_to(ROOT / "sflam")
        if path.name in ("__init__.py", "__main__.py") and relative.parent.name != "allocation":
            continue
        folder = f"{relative.parent.as_posix()}/" if relative.parent.as_posix() != "." else ""
        if f"`{relative.as_posix()}`" not in rows and f"`{folder}`" not in rows and f"`{path.name}`" not in rows:
            missing.append(relative.as_posix())
    assert not missing, f"modules without a row in the module map: {missing}"
