"""Is the Hub reachable? Asked once, in a few seconds, before the first Hub id is resolved.

Without a network (no route, no DNS, a firewall, a dead proxy) huggingface_hub retries every request with backoff
and then reports the *file* as missing: a correct Hub id failed after 44 s with "does not appear to have a file
named model_index.json". One short request to the endpoint tells "cannot reach the Hub" (and why) from "the repo or
the file is missing", so a run names the cause in one line before it waits on any retry. With ``HF_HUB_OFFLINE``
set, the callers keep their own offline message (nothing is requested).
"""

from __future__ import annotations

import functools

from .config import ConfigError, hub_offline

#: seconds the probe waits for the endpoint: enough for a slow link, far below huggingface_hub's retries
PROBE_TIMEOUT_S = 4.0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:200].rstrip(": ")


@functools.lru_cache(maxsize=8)
def hub_unreachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub endpoint answers (any HTTP status: it is there), else why it could not be reached.

    One HEAD request without retries, through huggingface_hub's own HTTP session (its proxies, certificates and
    headers). Cached per process: a run asks once however many Hub ids it resolves.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    url = endpoint or constants.ENDPOINT
    try:
        get_session().head(url, timeout=timeout, follow_redirects=False)
    except Exception as exc:  # connection refused, DNS failure, timeout, TLS or proxy errors
        return _first_line(exc)
    return None


def check_hub_reachable(
    what: str, repo_id: str, filename: str = "model_index.json", fix: str | None = None, **cache_kwargs
) -> None:
    """Raise a one-line :class:`ConfigError` when ``repo_id`` would be fetched from a Hub that cannot be reached.

    ``what`` names the flag or field (``--pretrained_model_name_or_path``); ``filename`` is the first file that
    would be read, used to say whether a copy is in the local Hub cache (then ``HF_HUB_OFFLINE=1`` uses it);
    ``fix`` replaces the default advice. Does nothing in offline mode: the callers report that case themselves.
    """
    if hub_offline():
        return
    from huggingface_hub import constants

    reason = hub_unreachable(constants.ENDPOINT)
    if reason is None:
        return
    cached = False
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(repo_id, filename, **cache_kwargs), str)
    except Exception:  # an id the cache cannot hold: not cached
        pass
    if fix is None:
        fix = (
            "it is in your Hub cache: set HF_HUB_OFFLINE=1 to use that copy"
            if cached
            else "connect to the network, or pass a local path (HF_HUB_OFFLINE=1 uses only what is already cached)"
        )
    raise ConfigError(
        f"{what} {repo_id!r} is a Hub id, but the Hub at {constants.ENDPOINT} cannot be reached ({reason}): no "
        f"network? The repo itself was not checked; {fix}."
    )


def hub_failure(
    exc: BaseException, filename: str = "model_index.json", missing_file: bool = True
) -> str | None:
    """What a failed Hub read ``exc`` says about the repo, as a clause with its fix; None when it says nothing
    specific (or only that ``filename`` is missing and ``missing_file`` is False: a caller that tries another
    kind of file next). diffusers and transformers wrap huggingface_hub's errors in ``OSError``; the cause chain
    keeps them."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GatedRepoError):
            return "the repo is gated: accept its terms on its Hub page, then log in (`hf auth login`)"
        if isinstance(exc, RepositoryNotFoundError):
            return (
                "no such repo on the Hub (or it is private and your token cannot see it): check the id "
                "(`owner/name`) and `hf auth whoami`"
            )
        if isinstance(exc, RevisionNotFoundError):
            return "the repo has no such revision: check --revision"
        if isinstance(exc, EntryNotFoundError):
            if not missing_file:
                return None
            return f"the repo exists but holds no {filename}: check that it is the right repo and subfolder"
        exc = exc.__cause__ or exc.__context__
    return None
