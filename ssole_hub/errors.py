"""Errors raised in more than one layer of ``ssole_hub`` (so that each layer imports only downward)."""

__all__ = ["HubFolderError"]


class HubFolderError(ValueError):
    """A hub folder (or a file in it) is incomplete, unreadable or does not fit its architecture:
    raised by :mod:`ssole_hub.hub` for its files and by :mod:`ssole_hub.runtimes` for ONNX files."""
