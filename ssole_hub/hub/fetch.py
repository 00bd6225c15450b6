"""Reaching a hub folder's files: on disk, or in a Hugging Face Hub repo through the HF cache.

Files are reached through a *fetch* function (file name -> local path), so a folder on disk and a
Hub repo are read by the same code (:mod:`ssole_hub.hub.folder`).

Hub files go through ``hf_hub_download`` and the standard HF cache, so ``HF_HUB_OFFLINE=1``,
``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and tokens work as everywhere else. One thing is
added: a file that is **not cached** is first looked up with a single request
(:func:`require_hub_file`). ``hf_hub_download`` on its own answers a failed lookup of an uncached
file by retrying it with exponential back-off (1 + 2 + 4 + 8 + 8 s, about half a minute without a
network) and then raises a generic "cannot find the requested files" error. The single lookup
fails at once instead, with :class:`HubUnavailableError` naming the repo and the ways out. A
reachable Hub sees one extra ``HEAD`` request on a file's first download; cached files are
untouched (``hf_hub_download`` falls back to them by itself, without retrying).

``import ssole_hub`` calls :func:`fail_fast_timm_downloads`, which puts the same single lookup in
front of the one function timm downloads Hub files with, so plain
``timm.create_model("ssole_resnet50", pretrained=True)`` and
``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` (and any other timm Hub download) fail
at once too, with :class:`HubUnavailableError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

__all__ = [
    "Fetch",
    "HubUnavailableError",
    "check_repo_id",
    "fail_fast_timm_downloads",
    "fetch_hub_file",
    "hub_fetch",
    "local_fetch",
    "require_hub_file",
]

Fetch = Callable[[str], Path]
"""Maps a hub folder file name to a local path (a folder file or a HF cache file)."""


class HubUnavailableError(FileNotFoundError):
    """A Hub file cannot be had: it is not in the local HF cache, and the Hub could not be reached
    (or has no such repo, revision or file). The message names the repo and the ways out."""


def ways_out(repo_id: str) -> str:
    """The ways to get a model without downloading ``repo_id``, as one sentence."""
    return (
        "Ways out: load a hub folder on disk (timm.create_model('local-dir:PATH', "
        "pretrained=True) or ssole_hub.load_model('PATH')); fill the HF cache where the Hub is "
        f"reachable (hf download {repo_id}) and run with HF_HUB_OFFLINE=1; or train your own "
        "(make demo, or python -m training.pretrain then ssole-hub export)."
    )


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a well-formed ``ORG/NAME``."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {exc}") from exc
    if repo_id.count("/") != 1:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected ORG/NAME")


def local_fetch(folder: Path) -> Fetch:
    """A fetch for a folder on disk; a missing file raises ``FileNotFoundError``."""

    def fetch(name: str) -> Path:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"hub folder {folder} has no {name}")
        return path

    return fetch


def _is_cached(repo_id: str, filename: str, revision: str | None, cache_dir: Any) -> bool:
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return isinstance(found, str)


def _not_found(repo_id: str, filename: str, exc: Exception) -> HubUnavailableError:
    if isinstance(exc, RepositoryNotFoundError):
        what = (
            f"Hub repo {repo_id!r} not found (not published yet, or private without a valid token)"
        )
    elif isinstance(exc, RevisionNotFoundError):
        what = f"Hub repo {repo_id!r} has no such revision"
    else:
        what = f"Hub repo {repo_id!r} has no {filename}"
    return HubUnavailableError(f"{what}. {ways_out(repo_id)}")


def require_hub_file(
    repo_id: str, filename: str, revision: str | None = None, cache_dir: Any = None
) -> None:
    """Return if ``filename`` of ``repo_id`` is cached or the Hub has it, else fail at once.

    Makes at most one request (a ``HEAD``, no retries) and only for a file that is not cached;
    with ``HF_HUB_OFFLINE=1`` it makes none.

    Raises:
        HubUnavailableError: the file is not cached and the Hub cannot be reached, answers with an
            error, or has no such repo, revision or file.
    """
    if _is_cached(repo_id, filename, revision, cache_dir):
        return
    where = f"{filename} of Hub repo {repo_id!r} is not in the local HF cache"
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailableError(
            f"{where} and HF_HUB_OFFLINE=1 forbids downloading it. {ways_out(repo_id)}"
        )
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        get_hf_file_metadata(url)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise _not_found(repo_id, filename, exc) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubUnavailableError(
            f"{where} and the Hub at {constants.ENDPOINT} answered HTTP {status}. "
            f"{ways_out(repo_id)}"
        ) from exc
    except Exception as exc:  # the HTTP client's own network errors (its types vary by version)
        raise HubUnavailableError(
            f"{where} and the Hub at {constants.ENDPOINT} cannot be reached "
            f"({type(exc).__name__}: {exc}). {ways_out(repo_id)}"
        ) from exc


def fetch_hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """Download (or take from the HF cache) one file of a Hub repo; returns its local path.

    Raises:
        HubUnavailableError: as :func:`require_hub_file`, at once, without a retry loop.
    """
    require_hub_file(repo_id, filename, revision)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as exc:  # the Hub went away between the lookup and the download
        raise HubUnavailableError(
            f"{filename} of Hub repo {repo_id!r} is not in the local HF cache and the Hub cannot"
            f" be reached. {ways_out(repo_id)}"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise _not_found(repo_id, filename, exc) from exc


def hub_fetch(repo_id: str, revision: str | None) -> Fetch:
    """A fetch for a Hub repo (:func:`fetch_hub_file`); a file it cannot have raises
    :class:`HubUnavailableError`, a ``FileNotFoundError``."""

    def fetch(name: str) -> Path:
        return fetch_hub_file(repo_id, name, revision)

    return fetch


class _TimmHubUnavailableError(HubUnavailableError, EntryNotFoundError):
    """:class:`HubUnavailableError` as timm's downloads raise it. It is also an
    ``EntryNotFoundError``, like the ``LocalEntryNotFoundError`` that ``hf_hub_download`` raises
    for an uncached file it cannot fetch, so timm's search through a repo's alternative weight
    files (``model.safetensors`` before ``pytorch_model.bin``) goes on as it would without the
    lookup, to a cached alternative if there is one."""


def fail_fast_timm_downloads() -> None:
    """Put :func:`require_hub_file`'s single lookup in front of timm's Hub downloads.

    timm downloads every Hub file (``hf-hub:`` configs and weights, and its own pretrained
    weights) through one function, ``timm.models._hub.hf_hub_download``. It is replaced by a
    wrapper that first calls :func:`require_hub_file`, then the original function unchanged: a
    cached file or a reachable Hub behaves as before (one extra ``HEAD`` on a file's first
    download), and a file that cannot be had raises :class:`HubUnavailableError` naming the repo
    at once, instead of after ``huggingface_hub``'s half-minute retry loop. Idempotent;
    ``import ssole_hub`` calls it. Does nothing if this timm has no such function.
    """
    try:
        from timm.models import _hub as timm_hub
    except ImportError:
        return
    download = getattr(timm_hub, "hf_hub_download", None)
    if download is None or getattr(download, "_ssole_fail_fast", False):
        return

    def hf_hub_download_fail_fast(repo_id: str, filename: str, *args: Any, **kwargs: Any) -> str:
        try:
            require_hub_file(repo_id, filename, kwargs.get("revision"), kwargs.get("cache_dir"))
        except HubUnavailableError as exc:
            raise _TimmHubUnavailableError(str(exc)) from exc.__cause__
        return download(repo_id, filename, *args, **kwargs)

    hf_hub_download_fail_fast._ssole_fail_fast = True  # type: ignore[attr-defined]
    hf_hub_download_fail_fast.__wrapped__ = download  # type: ignore[attr-defined]
    timm_hub.hf_hub_download = hf_hub_download_fail_fast
