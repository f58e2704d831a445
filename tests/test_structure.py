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
