"""MkDocs hooks: the reference pages written from the code at build time, never copied by hand.

A page asks for generated markdown with a marker:

    <!-- sflam:cli -->      every `sflam` command from `sflam.cli.build_parser()`: usage, help, options
    <!-- sflam:config -->   every config section and field of `sflam.platform.config`: dotted key, type,
                            default, allowed values (from the checks in `__post_init__`) and help text
    <!-- sflam:imports -->  the import graph between sflam's subpackages (a mermaid diagram)
    <!-- sflam:summary -->  the keys of a run's summary (`RunResult.summary`), in order

A config field without help text is listed at the top of the configuration page. After the build,
`docs/design-references.txt` is checked: every page and anchor it names must exist.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # document the checkout being built, not some other installed copy
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"<!-- sflam:(?P<name>[a-z]+) -->")
REFERENCES = ROOT / "docs" / "design-references.txt"
_anchors: dict[str, set[str]] = {}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def render(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_path}: unknown marker sflam:{name} (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(render, markdown)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    # docstrings rendered by mkdocstrings may still point into the old design notes: these pages replace them
    html = re.sub(r"\s*\(DESIGN §[^)]*\)", "", html)
    found: set[str] = set()

    def walk(items: Any) -> None:
        for item in items:
            found.add(item.id)
            walk(item.children)

    walk(page.toc)
    _anchors[page.file.src_path] = found
    return html


def on_post_build(config: Any) -> None:
    """Every `page.md#anchor` of docs/design-references.txt names a built page and one of its headings."""
    if not REFERENCES.is_file():
        return
    missing = []
    for line in REFERENCES.read_text().splitlines():
        for target in re.findall(r"\b([\w/-]+\.md)(?:#([\w-]+))?", line):
            page, anchor = target[0].removeprefix("docs/"), target[1]
            if page not in _anchors or (anchor and anchor not in _anchors[page]):
                missing.append(f"{page}#{anchor}" if anchor else page)
    if missing:
        raise PluginError(f"docs/design-references.txt names pages or anchors that do not exist: {', '.join(missing)}")


# --------------------------------------------------------------------------- the command line


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _sentence(text: str) -> str:
    return _cell(text[:1].upper() + text[1:] + ("" if text.endswith(".") else "."))


def _plain(text: str) -> str:
    """A docstring line without its pointer into the design notes (the docs are the design document)."""
    return re.sub(r"\s*\(DESIGN §[^)]*\)", "", text)


def cli_markdown() -> str:
    from sflam.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["| command | what it does |", "|---|---|"]
    out += [f"| [`sflam {name}`](#sflam-{name}) | {_cell(help_text)} |" for name, (_, help_text) in COMMANDS.items()]
    for name, command in sub.choices.items():
        formatter = argparse.HelpFormatter(command.prog, width=100)
        formatter.add_usage(command.usage, command._actions, command._mutually_exclusive_groups)
        out += ["", f"## sflam {name}", "", _sentence(COMMANDS[name][1]), "", "```text",
                formatter.format_help().strip(), "```", "", "| argument | default | what it is |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            expanded = formatter._expand_help(action) if action.help else ""
            names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
            if action.option_strings and action.nargs != 0:
                names += f" `{action.metavar or action.dest.upper()}`" + (" ..." if action.nargs in ("+", "*") else "")
            if action.choices and not isinstance(action.choices, dict):
                expanded += f" (one of {', '.join(map(str, action.choices))})"
            default = action.default
            shown = "—" if default in (None, False, argparse.SUPPRESS) or action.nargs == argparse.REMAINDER \
                else f"`{' '.join(map(str, default)) if isinstance(default, list) else default}`"
            out.append(f"| {names} | {shown} | {_cell(expanded)} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- the configuration


def _value(value: object) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.1f}" if value.is_integer() and abs(value) < 1e6 else f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _text(node: ast.expr, namespace: dict[str, Any], env: dict[str, Any]) -> str | None:
    """The text of a check's key or 'allowed' argument: literal, or evaluated from the module's names; a value
    that needs the instance (`{self.x}`, a local) is left out with the '=' before it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if not isinstance(node, ast.JoinedStr):
        return None
    parts: list[str] = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(str(value.value))
            continue
        assert isinstance(value, ast.FormattedValue)
        try:
            parts.append(str(eval(compile(ast.Expression(value.value), "<config>", "eval"), namespace, dict(env))))
        except Exception:  # needs the instance: say what, not which value
            if parts and parts[-1].endswith("="):
                parts[-1] = parts[-1][:-1]
            elif parts:
                parts[-1] = parts[-1] + "…"
    return "".join(parts)


def _checks(module: Any) -> dict[str, list[str]]:
    """dotted key -> what its `_check(...)` calls allow, read from every `__post_init__` of the module."""
    tree = ast.parse(Path(module.__file__).read_text())
    namespace = vars(module)
    found: dict[str, list[str]] = {}

    def visit(node: ast.AST, env: dict[str, Any]) -> None:
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            try:
                values = ast.literal_eval(node.iter)
            except ValueError:
                values = ()
            for value in values:
                for statement in node.body:
                    visit(statement, {**env, node.target.id: value})
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_check"
                and len(node.args) == 4):
            key, allowed = _text(node.args[1], namespace, env), _text(node.args[3], namespace, env)
            if key and allowed and allowed not in found.setdefault(key, []):
                found[key].append(allowed)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("_check_")
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            helper = namespace.get(node.func.id)  # a check written once for several keys: its docstring says what
            if helper is not None and helper.__doc__:
                found.setdefault(node.args[0].value, []).append(helper.__doc__.strip().splitlines()[0].rstrip("."))
        for child in ast.iter_child_nodes(node):
            visit(child, env)

    for cls in tree.body:
        if isinstance(cls, ast.ClassDef):
            for item in cls.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__post_init__":
                    visit(item, {})
    return found


def config_markdown() -> str:
    from sflam.platform import config as module

    checks: dict[str, list[str]] = {}
    for key, allowed in _checks(module).items():  # a list item's key names the item ([…]): one row for them all
        checks.setdefault(key.replace("[…]", "[]"), []).extend(allowed)
    sections: list[tuple[str, str, list[tuple[str, dataclasses.Field[Any]]]]] = [("top level", "", [])]
    hints = typing.get_type_hints(module.ExperimentConfig)
    for f in dataclasses.fields(module.ExperimentConfig):
        cls = hints[f.name]
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            doc = _plain((cls.__doc__ or "").strip().splitlines()[0])
            rows: list[tuple[str, dataclasses.Field[Any]]] = []
            inner = typing.get_type_hints(cls)
            for g in dataclasses.fields(cls):
                rows.append((f"{f.name}.{g.name}", g))
                (item,) = typing.get_args(inner[g.name]) if typing.get_origin(inner[g.name]) is list else (None,)
                if isinstance(item, type) and dataclasses.is_dataclass(item):  # a list of records: each item's keys
                    rows += [(f"{f.name}.{g.name}[].{h.name}", h) for h in dataclasses.fields(item)]
            sections.append((f.name, doc, rows))
        else:
            sections[0][2].append((f.name, f))
    sections[0] = ("top level", "Fields of `ExperimentConfig` itself: one experiment, every section composed.",
                   sections[0][2])
    lacking = [key for _, _, fields in sections for key, f in fields if not f.metadata.get("help")]
    out: list[str] = []
    if lacking:
        out += ['!!! warning "Fields without help text"', "",
                f"    {len(lacking)} field(s) carry no `metadata['help']` in `sflam/platform/config.py`: "
                + ", ".join(f"`{k}`" for k in lacking) + ".", ""]
    count = sum(len(fields) for _, _, fields in sections)
    out.append(f"{len(sections)} sections, {count} fields, from `sflam/platform/config.py`.")
    for name, doc, fields in sections:
        out += ["", f"## {name}", "", doc, "", "| key | type | default | allowed | what it is |",
                "|---|---|---|---|---|"]
        for key, f in fields:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            help_text = f.metadata.get("help") or "**no help text**"
            allowed = "; ".join(checks.get(key, [])) or "—"
            out.append(f"| `{key}` | `{_cell(kind)}` | `{_cell(_value(default))}` | {_cell(allowed)} | "
                       f"{_cell(help_text)} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- the import graph


def _imported(path: Path, package: str) -> set[str]:
    """The sflam modules a module imports, at any depth of its code (a function-level import counts too)."""
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


def imports_markdown() -> str:
    """Which subpackage imports which (an arrow A --> B: A imports B), with the number of module imports."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "sflam").rglob("*.py")}

    def unit(name: str) -> str:
        parts = name.split(".")
        return "sflam.cli" if parts[:2] == ["sflam", "__main__"] else ".".join(parts[:2])

    edges: dict[tuple[str, str], int] = {}
    for name, path in modules.items():
        for dep in _imported(path, name):
            if dep in modules and unit(dep) != unit(name) and unit(name) != "sflam":
                edges[unit(name), unit(dep)] = edges.get((unit(name), unit(dep)), 0) + 1
    nodes = sorted({n for edge in edges for n in edge})
    ident = {n: n.replace("sflam.", "").replace(".", "_") for n in nodes}
    lines = ["```mermaid", "graph TD"]
    lines += [f'  {ident[n]}["{n}"]' for n in nodes]
    lines += [f"  {ident[a]} -->|{count}| {ident[b]}" for (a, b), count in sorted(edges.items())]
    return "\n".join([*lines, "```"])


# --------------------------------------------------------------------------- the run summary


def summary_markdown() -> str:
    """The keys of a run's summary (`RunResult.summary`), in their order, read from its source."""
    tree = ast.parse((ROOT / "sflam" / "platform" / "results.py").read_text())
    method = next(node for cls in tree.body if isinstance(cls, ast.ClassDef) and cls.name == "RunResult"
                  for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "summary")
    returned = next(node.value for node in ast.walk(method) if isinstance(node, ast.Return)
                    and isinstance(node.value, ast.Dict))
    keys = [str(key.value) for key in returned.keys if isinstance(key, ast.Constant)]
    return ", ".join(f"`{key}`" for key in keys)


GENERATORS = {"cli": cli_markdown, "config": config_markdown, "imports": imports_markdown,
              "summary": summary_markdown}
