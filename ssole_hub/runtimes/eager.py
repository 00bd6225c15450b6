"""The ``torch`` backend: eager PyTorch on any device, in the compute dtype asked for.

:class:`~ssole_hub.extractor.FeatureExtractor` runs a private eval-mode copy of the model
(:func:`inference_model`, its backbone's BatchNorm layers folded into the convolutions before
them by :func:`fold_batchnorm`) on :func:`default_device` in :func:`resolve_dtype`'s dtype.
"""

from __future__ import annotations

import collections
import copy
import logging

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ssole_hub.models import SSOLEModel

__all__ = ["default_device", "fold_batchnorm", "inference_model", "resolve_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: ``None`` / ``"auto"`` means bfloat16 on a CUDA device that supports it
    (float16 on older GPUs) and float32 elsewhere.

    Raises:
        ValueError: an unknown dtype name, or a dtype that is not a float type.
    """
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def default_device(device: torch.device | str | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_model(model: nn.Module) -> SSOLEModel:
    """A private eval-mode copy of ``model`` as an :class:`SSOLEModel`, its backbone's
    BatchNorm layers folded (:func:`fold_batchnorm`); ``model`` is untouched."""
    if not isinstance(model, SSOLEModel):
        projector = getattr(model, "projector", None)
        backbone = getattr(model, "backbone", None)
        model = SSOLEModel(backbone, projector) if backbone is not None else SSOLEModel(model)
    model = copy.deepcopy(model).eval().requires_grad_(False)
    fold_batchnorm(model.backbone)
    return model


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` that only normalises one ``Conv2d``'s output into that
    convolution's weight and bias, and replace it with ``nn.Identity``: the same function in
    float32 (to rounding), one pass over the activations fewer per layer (a ResNet-18 forward
    on the CPU took 1.2x less time, BENCHMARKS.md). Pairs are found by tracing ``module`` with
    ``torch.fx``; a module that does not trace, and layers called more than once, stay as they
    are. Changes ``module`` in place; returns how many layers were folded.
    """
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception as e:  # fx raises many kinds; an untraceable model stays as it is
        log.debug("BatchNorm not folded: %s does not trace (%s)", type(module).__name__, e)
        return 0
    modules = dict(module.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = 0
    for node in graph.nodes:
        bn, source = modules.get(node.target), node.args[0] if node.args else None
        if not (node.op == "call_module" and isinstance(bn, nn.BatchNorm2d)):
            continue
        conv = modules.get(source.target) if isinstance(source, fx.Node) else None
        if not (
            isinstance(conv, nn.Conv2d)
            and source.op == "call_module"
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
            and not bn.training
            and bn.running_mean is not None
        ):
            continue
        with torch.no_grad():
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        parent, _, name = node.target.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, name, nn.Identity())
        folded += 1
    return folded
