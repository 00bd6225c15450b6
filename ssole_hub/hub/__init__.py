"""Hub folders on disk and on the Hugging Face Hub: one module per job.

- :mod:`ssole_hub.hub.folder`: the folder format (file names, ``config.json`` keys) and its
  readers, which fail with clear errors;
- :mod:`ssole_hub.hub.fetch`: reaching a folder's files, on disk or in a Hub repo (through the HF
  cache), with a fast, clear failure when the Hub cannot be reached;
- :mod:`ssole_hub.hub.export`: :func:`~ssole_hub.hub.export.export_hub_folder` and
  :func:`~ssole_hub.hub.export.validate_hub_folder`;
- :mod:`ssole_hub.hub.publish`: :func:`~ssole_hub.hub.publish.push_to_hub`;
- :mod:`ssole_hub.hub.load`: :func:`~ssole_hub.hub.load.load_model`, the one model loader;
- :mod:`ssole_hub.hub.model_card` and :mod:`ssole_hub.hub.model_stats`: the card an export
  writes, and the figures (parameters, MACs, activations) it measures for it;
- :mod:`ssole_hub.hub.checkpoint`: the training-checkpoint format that export reads;
- :mod:`ssole_hub.hub.convert`: :func:`~ssole_hub.hub.convert.convert_checkpoint`, official SSOLE
  and torchvision checkpoints into hub folders;
- :mod:`ssole_hub.hub.torch_hub`: the ``torch.hub`` entry points ``hubconf.py`` re-exports.

The public names are exported once, from :mod:`ssole_hub`.
"""
