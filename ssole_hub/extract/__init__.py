"""Batch extraction of whole datasets: :func:`~ssole_hub.extract.dataset.extract_dataset` (also
``ssole_hub.extract_dataset`` and ``ssole-hub extract``) and its output reader
:func:`~ssole_hub.extract.output.read_embeddings` (also ``ssole_hub.read_embeddings``).

The data flow, one module each: :mod:`~ssole_hub.extract.inputs` (folders, list files, tars,
parquet, cut into input shards) -> an engine, :mod:`~ssole_hub.extract.plain` (this machine or
``torchrun``) or :mod:`~ssole_hub.extract.ray` (a Ray cluster, and the
:class:`~ssole_hub.extract.ray.Embedder` for your own Ray Data pipelines), which share
:mod:`~ssole_hub.extract.resume` and never import each other -> :mod:`~ssole_hub.extract.output`
(shards, ids, manifest, errors, done-markers).
"""
