"""The house's size limits (issue 23): no source file over 800 lines, the training script at most 1,000."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: where the project's source lives (tests are not source; the exported pipeline file is counted once)
SOURCE_DIRS = ("danceopd_diffusers", "benchmarks")


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_source_file_is_over_800_lines_and_the_script_is_at_most_1000():
    long = {
        str(p.relative_to(REPO)): _lines(p)
        for d in SOURCE_DIRS
        for p in (REPO / d).rglob("*.py")
        if _lines(p) > 800
    }
    assert not long, long
    assert _lines(REPO / "train_danceopd.py") <= 1000


def test_the_script_speaks_through_one_logger_and_imports_at_its_top():
    """One output channel (the ``danceopd`` logger; ``cli.run_command`` owns the ``error:`` line) and every import
    at the top of the script, as diffusers' examples have them."""
    import ast

    tree = ast.parse((REPO / "train_danceopd.py").read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    printing = [
        n.lineno
        for n in calls
        if (isinstance(n.func, ast.Name) and n.func.id == "print")
        or (isinstance(n.func, ast.Attribute) and n.func.attr == "print")
    ]
    assert not printing, f"print calls at lines {printing}: use the logger"
    nested = [
        n.lineno
        for top in tree.body
        if not isinstance(top, (ast.Import, ast.ImportFrom))
        for n in ast.walk(top)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]
    assert not nested, f"imports inside functions at lines {nested}"
