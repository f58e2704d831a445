"""Check code copied from diffusers against the installed (pinned) diffusers, as diffusers' ``utils/check_copies.py``.

Two markers, each on the comment lines right above a ``def`` or ``class`` (or its decorators):

- ``# Copied from diffusers.<module>.<Class>.<method>`` (optionally ``with Old->New[, Old2->New2]``, regular
  expressions applied to the stock source first, as in diffusers): the block must be the stock object's code.
- ``# Adapted from diffusers.<module>.<Class>.<method>``, followed by the lines that differ, one per comment line
  ``#   - <stock line>`` / ``#   + <our line>``: the block must be the stock object's code except exactly those
  lines (its name, decorators and docstring are its own). The record is the precise list of what was changed, so a
  block that has to differ from stock still fails on any other edit, and on any change of the stock code.

Code is compared in ``ast.unparse``'s canonical form: formatting and comments do not count (our line length is not
diffusers'), names, values and structure do; docstrings are compared with their indentation cleaned. So a
diffusers upgrade that changes copied code, or an edit of a copied line, fails ``tests/test_copies.py``.

Run ``python -m danceopd_diffusers.check_copies`` to list problems, ``--fix_and_overwrite`` to rewrite the
recorded differences of ``Adapted from`` blocks after reviewing them (copies are never rewritten).
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import importlib
import inspect
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_MARKER = re.compile(r"^\s*# (Copied|Adapted) from (diffusers(?:\.\w+)+)(?: with (.+))?\s*$")
_RECORD = re.compile(r"^\s*#   ([-+]) (.*)$")
_REPLACEMENT = re.compile(r"^\s*(\S+)->(\S+)\s*$")


@dataclass
class Marked:
    """One marked block of a file."""

    path: Path
    kind: str  # "Copied" or "Adapted"
    target: str  # dotted name of the stock object
    replacements: list[tuple[str, str]]
    record: list[str]  # Adapted: the recorded "-"/"+" lines
    marker_line: int  # 0-based index of the marker line
    record_end: int  # 0-based index after the last record line
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def stock_source(target: str) -> str:
    """The source of a diffusers object named by its dotted path (module, then attributes), dedented."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return textwrap.dedent(inspect.getsource(inspect.unwrap(obj)))
    raise ImportError(f"Cannot import {target}.")


def _definition(code: str) -> ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef:
    node = ast.parse(code).body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        raise ValueError("A marker must stand above a def or a class.")
    return node


def _docstring(node: ast.AST) -> ast.Constant | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            return body[0].value
    return None


def canonical(node: ast.AST, own_header: bool = False) -> list[str]:
    """``node`` as ``ast.unparse`` lines with docstrings cleaned; ``own_header`` drops the name, decorators and
    top docstring (what an adapted block may make its own)."""
    node = copy.deepcopy(node)
    for inner in ast.walk(node):
        doc = _docstring(inner)
        if doc is not None:
            doc.value = inspect.cleandoc(doc.value)
    if own_header:
        node.name, node.decorator_list = "_", []
        if _docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(node).splitlines()


def differences(stock: list[str], ours: list[str]) -> list[str]:
    """The ``-``/``+`` lines that turn ``stock`` into ``ours``."""
    diff = difflib.unified_diff(stock, ours, lineterm="", n=0)
    return [line for line in diff if line[:1] in "-+" and not line.startswith(("---", "+++"))]


def find_marked(path: Path) -> list[Marked]:
    """Every marked block of a Python file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = {}
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            starts[min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1] = node
    found = []
    for i, line in enumerate(lines):
        match = _MARKER.match(line)
        if not match:
            continue
        kind, target, with_part = match.groups()
        end = i + 1
        while end < len(lines) and _RECORD.match(lines[end]):
            end += 1
        node = starts.get(end)
        if node is None:
            raise ValueError(f"{path}:{i + 1}: the marker stands above no def or class.")
        replacements = []
        for item in (with_part or "").split(","):
            if item.strip():
                parsed = _REPLACEMENT.match(item)
                if parsed is None:
                    raise ValueError(f"{path}:{i + 1}: {item!r} is not an Old->New replacement.")
                replacements.append(parsed.groups())
        record = [f"{m.group(1)}{m.group(2)}" for m in map(_RECORD.match, lines[i + 1 : end])]
        found.append(Marked(path, kind, target, replacements, record, i, end, node))
    return found


def problems_of(marked: Marked) -> list[str]:
    """What is wrong with one marked block (empty when it matches the installed diffusers)."""
    where = f"{marked.path}:{marked.node.lineno}"
    stock_code = stock_source(marked.target)
    for old, new in marked.replacements:
        stock_code = re.sub(old, new, stock_code)
    adapted = marked.kind == "Adapted"
    stock = canonical(_definition(stock_code), own_header=adapted)
    ours = canonical(marked.node, own_header=adapted)
    found = differences(stock, ours)
    if not adapted:
        return [f"{where}: differs from {marked.target}: " + "; ".join(found[:6])] if found else []
    if found != marked.record:
        return [
            f"{where}: the lines that differ from {marked.target} are not the recorded ones. Now:\n  "
            + "\n  ".join(found)
        ]
    return []


def python_files(root: Path = PACKAGE_DIR) -> Iterable[Path]:
    return sorted(p for p in root.rglob("*.py") if not p.is_symlink())


def check(files: Iterable[Path] | None = None) -> tuple[list[Marked], list[str]]:
    """All marked blocks of ``files`` (default: the package) and their problems."""
    marked = [m for path in (python_files() if files is None else files) for m in find_marked(Path(path))]
    return marked, [p for m in marked for p in problems_of(m)]


def rewrite_records(marked: Marked) -> None:
    """Record the current differences of an ``Adapted from`` block (after a reviewed diffusers change)."""
    stock = canonical(_definition(stock_source(marked.target)), own_header=True)
    found = differences(stock, canonical(marked.node, own_header=True))
    lines = marked.path.read_text(encoding="utf-8").splitlines(keepends=True)
    marker = lines[marked.marker_line]
    indent = marker[: len(marker) - len(marker.lstrip())]
    lines[marked.marker_line + 1 : marked.record_end] = [f"{indent}#   {d[0]} {d[1:]}\n" for d in found]
    marked.path.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fix_and_overwrite", action="store_true", help="rewrite Adapted-from records")
    args = parser.parse_args(argv)
    marked, problems = check()
    if args.fix_and_overwrite:
        for block in reversed(marked):  # bottom-up, so earlier blocks keep their line numbers
            if block.kind == "Adapted" and problems_of(block):
                rewrite_records(block)
        marked, problems = check()
    print(f"{len(marked)} marked blocks, {len(problems)} problems")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
