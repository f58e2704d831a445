"""Command-line parsing that fails in one line: a mistyped flag names the flag it probably meant.

argparse answers a bad flag with the whole usage block (about 60 lines for ``train_danceopd.py``) and the error at
its end. Under ``accelerate launch`` the launcher prints the child's stderr, then raises with that stderr as the
message, so the block appears twice and the error is buried. :class:`ArgumentParser` prints only the error, a
"did you mean" when a known flag is close, and where to find every option.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn


def suggest_option(message: str, options: list[str]) -> str | None:
    """The known flag closest to the first unknown one named in an argparse error ``message``, if any is close."""
    for token in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", message):
        name = token.split("=", 1)[0]
        if name in options:
            continue
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        if not close and "-" in name[2:]:  # --learning-rate for --learning_rate
            close = difflib.get_close_matches(name[:2] + name[2:].replace("-", "_"), options, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line (plus a "did you mean") and exit status 2."""

    def error(self, message: str) -> NoReturn:
        options = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        guess = suggest_option(message, options)
        hint = f"; did you mean {guess}?" if guess else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (every option: {self.prog} --help)\n")
