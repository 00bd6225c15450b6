"""The size and cost figures of a model card, measured on the model: :func:`measure_model_stats`.

They are counted the way timm's model cards count them: parameters of the module; MACs of one
image at the model's input size (``torch.utils.flop_counter``: convolutions and matrix products,
MACs = FLOPs / 2); activations as the output elements of every convolution and linear layer (what
fvcore's activation count gives). For timm's ``resnet50`` at 224 px that is 4.1 GMACs and 11.1 M
activations, the figures timm publishes. The same pass records the shape of each feature map
``timm.create_model(..., features_only=True)`` returns (the modules of timm's ``feature_info``).
The forward pass runs on the ``meta`` device, so no arithmetic is done and the weights are not
touched.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ModelStats", "measure_model_stats"]


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of one forward pass of one image, as a model card states them."""

    params_m: float
    """Parameters, in millions (buffers such as BatchNorm statistics not counted)."""
    gmacs: float
    """Multiply-accumulates of one image at ``image_size``, in billions."""
    activations_m: float
    """Output elements of the convolution and linear layers for one image, in millions."""
    image_size: tuple[int, int]
    """``(height, width)`` the figures were measured at: the model's ``pretrained_cfg`` input size."""
    feature_maps: tuple[tuple[int, int, int], ...] = ()
    """``(channels, height, width)`` of each map ``features_only=True`` gives for one image."""

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values (tuples as lists), for ``ssole.json``."""
        return {
            **asdict(self),
            "image_size": list(self.image_size),
            "feature_maps": [list(shape) for shape in self.feature_maps],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelStats:
        """Read what :meth:`to_dict` wrote."""
        return cls(
            params_m=float(data["params_m"]),
            gmacs=float(data["gmacs"]),
            activations_m=float(data["activations_m"]),
            image_size=tuple(int(v) for v in data["image_size"]),
            feature_maps=tuple(tuple(int(v) for v in s) for s in data.get("feature_maps", ())),
        )


def measure_model_stats(model: nn.Module, input_size: Sequence[int]) -> ModelStats:
    """Measure ``model`` (a backbone) for one image of ``input_size`` ``(C, H, W)``.

    ``model`` itself is left as it is: a copy on the ``meta`` device runs the forward pass.

    Raises:
        ValueError: ``input_size`` is not three positive integers.
    """
    if len(input_size) != 3 or min(int(v) for v in input_size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with positive sizes, got {input_size}")
    params = sum(p.numel() for p in model.parameters())
    meta = copy.deepcopy(model).to("meta").eval()
    activations = 0
    feature_maps: dict[str, tuple[int, ...]] = {}

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal activations
        activations += output.numel()

    for module in meta.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            module.register_forward_hook(count)

    def record(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            feature_maps.setdefault(name, tuple(output.shape[1:]))

        return hook

    for name in _feature_modules(meta):
        meta.get_submodule(name).register_forward_hook(record(name))
    images = torch.empty(1, *(int(v) for v in input_size), device="meta")
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        meta(images)
    return ModelStats(
        params_m=round(params / 1e6, 3),
        gmacs=round(flops.get_total_flops() / 2e9, 3),
        activations_m=round(activations / 1e6, 3),
        image_size=(int(input_size[1]), int(input_size[2])),
        feature_maps=tuple(feature_maps[name] for name in _feature_modules(meta)),
    )


def _feature_modules(model: nn.Module) -> list[str]:
    """The modules whose outputs timm's ``features_only`` returns (none if timm does not say)."""
    info = getattr(model, "feature_info", None) or []
    return [entry["module"] for entry in info if isinstance(entry, Mapping) and "module" in entry]
