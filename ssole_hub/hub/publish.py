"""Publishing a hub folder to the Hugging Face Hub: :func:`push_to_hub`."""

from __future__ import annotations

import os

from huggingface_hub import CommitInfo, HfApi

from ssole_hub.hub.export import validate_hub_folder
from ssole_hub.hub.fetch import check_repo_id
from ssole_hub.hub.folder import HUB_FILES
from ssole_hub.onnx_backend import ONNX_FILES

__all__ = ["push_to_hub"]


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
            folder; huggingface_hub errors for refused requests (authentication, permissions).
    """
    check_repo_id(repo_id)
    info = validate_hub_folder(folder)
    api = HfApi(token=token)
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
