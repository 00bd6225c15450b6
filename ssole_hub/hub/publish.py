"""Publishing a hub folder to the Hugging Face Hub: :func:`push_to_hub`."""

from __future__ import annotations

import os

from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

from ssole_hub.hub.export import validate_hub_folder
from ssole_hub.hub.fetch import check_repo_id
from ssole_hub.hub.folder import HUB_FILES
from ssole_hub.runtimes.backends import ONNX_FILES

__all__ = ["push_to_hub"]

_HTTP_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
"""Packages whose exceptions are transport failures (the client's HTTP library varies by
version); the Hub's own answers come as ``HfHubHTTPError``."""


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Publish a hub folder to the Hugging Face Hub; returns the commit (a ``str``: its URL).

    The folder is validated first and refused if invalid. The repo is created if needed
    (``exist_ok``), the branch ``revision`` too, then the folder's files are uploaded in one
    commit. The token comes from ``token``, else ``HF_TOKEN`` or the ``hf auth login`` cache.

    Raises:
        ValueError: for a malformed repo id; HubFolderError / FileNotFoundError for an invalid
            folder.
        ConnectionError: the Hub (``HF_ENDPOINT``) cannot be reached; no commit was made.
        PermissionError: the Hub refused the token (HTTP 401 or 403); no commit was made.
        huggingface_hub.errors.HfHubHTTPError: any other refused request.
    """
    check_repo_id(repo_id)
    info = validate_hub_folder(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=info.path,
            revision=revision,
            repo_type="model",
            allow_patterns=[*HUB_FILES, *ONNX_FILES.values()],
            commit_message=commit_message or f"Upload SSOLE {info.architecture} hub folder",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status not in (401, 403):
            raise
        reason = exc.server_message or str(exc).splitlines()[0]
        raise PermissionError(
            f"the Hub at {constants.ENDPOINT} refused to let this token write {repo_id} "
            f"(HTTP {status}: {reason}); no commit was made. Set HF_TOKEN to a token with write "
            "access to it, or run `hf auth login`."
        ) from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in _HTTP_LIBRARIES:
            raise
        raise ConnectionError(
            f"cannot reach the Hub at {constants.ENDPOINT} to push {repo_id} "
            f"({type(exc).__name__}: {exc}); no commit was made. Check the network connection, "
            "HF_ENDPOINT and any proxy settings, then run the same command again."
        ) from exc
