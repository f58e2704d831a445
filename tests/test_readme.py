"""The README stays a five-minute read that works: at most 250 lines, no relative link to a missing file (in it and
in the docs pages it sends readers to), and the exact install and test commands that `.ci/run` runs as "the
README's" (the command after each `# README:` comment there). Offline, text only."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
# the pages the README's details moved to; every Markdown file under docs/ is checked too
LINKED_PAGES = (README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md")))
# [text](target) and [text](target "title"); images too. Code spans are removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)[^`]*?\1")
# CI-only pip switches: a quiet install is the same install
QUIET = {"-q", "--quiet", "-qq", "-qqq"}


def _relative_links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
            continue  # a URL, a mail address or an anchor of the same page
        targets.append(target)
    return targets


def _ci_readme_commands() -> list[str]:
    """The first command after each `# README:` comment block of .ci/run that is an install or a test command."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = []
    for i, line in enumerate(lines):
        if not line.startswith("# README:"):
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].lstrip().startswith("#")):
            j += 1
        if j < len(lines) and re.match(r"(pip|python3?) ", lines[j].strip()):
            commands.append(lines[j].strip())
    return commands


def _without_quiet(command: str) -> str:
    return " ".join(word for word in command.split() if word not in QUIET)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_LINES}); move details to docs/ and history to CHANGELOG.md"
    )


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    missing = [
        target
        for target in _relative_links(page)
        if not (page.parent / target.split("#", 1)[0].split("?", 1)[0]).exists()
    ]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_has_the_commands_ci_runs():
    commands = _ci_readme_commands()
    assert any(c.startswith("pip install") for c in commands) and any("pytest" in c for c in commands), (
        f".ci/run's `# README:` comments no longer precede an install and a test command: {commands}"
    )
    readme_lines = {line.strip() for line in README.read_text(encoding="utf-8").splitlines()}
    for command in commands:
        assert command in readme_lines or _without_quiet(command) in readme_lines, (
            f"README.md lost the command .ci/run runs as the README's: {command!r}"
        )


def test_the_link_check_sees_links(tmp_path: Path):
    """The checker itself: it finds a missing file, ignores URLs, anchors and code, and reads anchored links."""
    (tmp_path / "there.md").write_text("x", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[a](there.md#part) [b](missing.md) [c](https://example.com) [d](#here) `[e](nope.md)`\n"
        '```\n[f](nope2.md)\n```\n![g](img.png "title")\n',
        encoding="utf-8",
    )
    assert _relative_links(page) == ["there.md#part", "missing.md", "img.png"]
    assert (
        _without_quiet('pip install -q torch==2.13.0 -e ".[test]"')
        == 'pip install torch==2.13.0 -e ".[test]"'
    )
