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
import sys
from collections.abc import Callable
from typing import Any, NoReturn


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not the empty ones: None, off switches; the help says what
    happens then); the epilog's examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def run_command(main: Callable[[Any], None], parse_args: Callable[[Any], Any], argv: list[str] | None) -> int:
    """``main(parse_args(argv))`` as a command: bad input is one ``error:`` line on stderr and exit status 2, a
    non-finite run status 1 (nothing broken saved), an interrupted run the signal's status; never a traceback for
    what the user can fix."""
    from .config import ConfigError
    from .stopping import Interrupted, NonFiniteError

    try:
        main(parse_args(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"[danceopd] {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
