"""Can weights be had? The local Hugging Face cache first, then one quick, bounded look at the Hub.

``huggingface_hub.hf_hub_download`` retries a failed connection five times with back-off (about 23 s per file
on a machine without network), and transformers' loaders can retry for minutes. The registry never calls
them to find out whether a file exists: it reads the cache (``try_to_load_from_cache``: no network), and
otherwise sends one HEAD request without retries, in a thread it waits on for at most
``probe_timeout()`` seconds (``CLIPAUDIT_HUB_PROBE_TIMEOUT``, default 5 s), so that even a hanging DNS
lookup cannot hold a run up. With ``HF_HUB_OFFLINE`` set there is no request at all.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from .errors import ModelUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "true", "yes", "on"}


def probe_timeout() -> float:
    """Seconds one availability probe may take (env ``CLIPAUDIT_HUB_PROBE_TIMEOUT``, default 5)."""
    try:
        return max(0.1, float(os.environ.get("CLIPAUDIT_HUB_PROBE_TIMEOUT", DEFAULT_PROBE_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_PROBE_TIMEOUT_S


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set now (read from the environment, and as huggingface_hub read it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: str | None) -> str:
    """The hub cache directory that is searched: ``cache_dir`` or huggingface_hub's (HF_HUB_CACHE / HF_HOME)."""
    if cache_dir:
        return os.path.expanduser(cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached_hub_file(repo_id: str, filename: str, cache_dir: str | None, revision: str | None = None) -> str | None:
    """The local path of ``filename`` of ``repo_id`` at ``revision`` (None: main) in the hub cache, or None; no
    network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(cache_dir), revision=revision)
    except ValueError:
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


@dataclass(frozen=True)
class Probe:
    """The answer of one probe: ``exists`` implies ``reachable``; ``reason`` says why not, for messages."""

    reachable: bool
    exists: bool
    reason: str = ""


def _bounded(call: Callable[[], Probe], timeout: float, what: str) -> Probe:
    """Run ``call`` in a daemon thread; no answer within ``timeout`` (+1 s) counts as unreachable."""
    box: list[Probe] = []

    def target() -> None:
        try:
            box.append(call())
        except Exception as exc:  # noqa: BLE001 - any failure to answer means "cannot be reached"
            box.append(Probe(False, False, f"{what} cannot be reached: {type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=target, name="clipaudit-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not box:
        return Probe(False, False, f"no answer from {what} within {timeout + 1.0:g} s")
    return box[0]


def probe_hub_file(repo_id: str, filename: str) -> Probe:
    """Whether the Hub can be reached and holds ``filename`` in ``repo_id``: one HEAD request, no retries."""
    if hub_offline():
        return Probe(False, False, "HF_HUB_OFFLINE is set")
    timeout = probe_timeout()

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT.rstrip("/")
    url = f"{endpoint}/{repo_id}/resolve/main/{quote(filename)}"

    def call() -> Probe:
        from huggingface_hub import get_hf_file_metadata
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            get_hf_file_metadata(url, timeout=timeout)
        except GatedRepoError as exc:
            return Probe(True, False, f"the repository {repo_id} is gated (log in with a token that has access): "
                                      f"{_first_line(exc)}")
        except RepositoryNotFoundError:
            return Probe(True, False, f"no repository {repo_id!r} on the Hub (or it is private)")
        except (EntryNotFoundError, RevisionNotFoundError):
            return Probe(True, False, f"the Hub repository {repo_id} has no file {filename!r}")
        except HfHubHTTPError as exc:
            return Probe(False, False, f"the Hub answered with an error: {_first_line(exc)}")
        return Probe(True, True)

    result = _bounded(call, timeout, endpoint)
    logger.debug("hub probe %s/%s: %s", repo_id, filename, result)
    return result


def probe_url(url: str) -> Probe:
    """Whether a plain URL answers a HEAD request within ``probe_timeout()``; offline mode means no."""
    if hub_offline():
        return Probe(False, False, "HF_HUB_OFFLINE is set")
    timeout = probe_timeout()

    def call() -> Probe:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return Probe(True, True)
        except urllib.error.HTTPError as exc:
            return Probe(True, False, f"{url} answered HTTP {exc.code}")

    return _bounded(call, timeout, url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_hub_file(spec: str, repo_id: str, names: list[str], cache_dir: str | None, revision: str | None = None,
                  hint: str = "") -> str | None:
    """The first of ``names`` of ``repo_id`` found in the hub cache; None when none is cached but one can be
    downloaded (at most one bounded probe per name, stopping at the first answer); else ModelUnavailableError
    naming the files, the cache and why the Hub cannot help."""
    for name in names:
        found = cached_hub_file(repo_id, name, cache_dir, revision)
        if found:
            return found
    probe = Probe(False, False)
    for name in names:
        probe = probe_hub_file(repo_id, name)
        if probe.exists or not probe.reachable:
            break
    if probe.exists:
        return None
    raise ModelUnavailableError(
        spec, f"its weights ({' or '.join(names)} of the Hugging Face repo {repo_id}) are not in the cache "
              f"{hub_cache_dir(cache_dir)} and cannot be downloaded ({probe.reason})",
        hint=hint or f"on a machine with internet: `hf download {repo_id}` and copy its cache here")


def find_url_file(spec: str, url: str, target: str) -> str | None:
    """``target`` (where a loader downloads ``url``) when it is there; None when absent but ``url`` answers; else
    ModelUnavailableError."""
    if os.path.isfile(target):
        return target
    probe = probe_url(url)
    if probe.exists:
        return None
    raise ModelUnavailableError(spec, f"its weights are not at {target} and {url} cannot be fetched "
                                      f"({probe.reason})", hint=f"download {url} to {target}")
