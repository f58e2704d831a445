"""The package's one output channel: the ``danceopd`` logger.

What a run says goes through this logger, from the script and the library alike: information to stdout as
``[danceopd] ...``, warnings and errors to stderr as ``warning: ...`` (the CLI's ``error: ...`` line for bad input
stays the command line's own). The handlers write to whatever ``sys.stdout`` / ``sys.stderr`` are at the time of
the message, so redirections made after the first import (pytest's capture, a notebook's) are honoured.

Like ``diffusers.utils.logging``, the handlers are installed on the library's root logger the first time a module
asks for a logger, and the level is INFO until :func:`setup_logging` sets it per process: a multi-process run
speaks once, from its local main process, as ``accelerator.print`` did.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "danceopd"


class _LowerLevelName(logging.Formatter):
    """``warning: ...`` / ``error: ...``, as command lines write them."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return self._style._fmt % {
            **record.__dict__,
            "levelname": record.levelname.lower(),
            "message": record.message,
        }


class _CurrentStream(logging.StreamHandler):
    """A handler of the records in ``levels`` that writes to the current ``sys.<name>``."""

    def __init__(self, name: str, fmt: str, accept) -> None:
        super().__init__()
        self._name = name
        self.setFormatter(_LowerLevelName(fmt))
        self.addFilter(lambda record: accept(record.levelno))

    @property
    def stream(self):  # noqa: D401 - the stream of the moment
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always reads sys
        pass


def _configure_root() -> logging.Logger:
    root = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _CurrentStream) for h in root.handlers):
        root.addHandler(_CurrentStream("stdout", "[danceopd] %(message)s", lambda n: n < logging.WARNING))
        root.addHandler(
            _CurrentStream("stderr", "%(levelname)s: %(message)s", lambda n: n >= logging.WARNING)
        )
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    return root


def get_logger(name: str | None = None) -> logging.Logger:
    """The package's logger (``danceopd``) or one below it, with the package's handlers installed."""
    root = _configure_root()
    return root if not name else logging.getLogger(f"{LOGGER_NAME}.{name}")


def setup_logging(local_main_process: bool | None = None) -> None:
    """Per-process verbosity, set before anything else is said: the local main process informs, the others only
    report errors; diffusers and transformers keep to warnings (errors on the other processes), as diffusers'
    training examples set them. Without an answer, the process's ``LOCAL_RANK`` (set by ``accelerate launch``)
    decides."""
    import diffusers
    import transformers

    if local_main_process is None:
        local_main_process = int(os.environ.get("LOCAL_RANK", "0")) == 0
    _configure_root().setLevel(logging.INFO if local_main_process else logging.ERROR)
    if local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
