"""Convolutions that apply the residual add and the ReLU after them as they write their output.

On the CPU, eager torch runs a ResNet block's last convolution, the residual add and the ReLU as
three passes over the activations. oneDNN, which runs the convolution, can apply the add and the
ReLU to each value as it writes it (torch.ops.mkldnn._convolution_pointwise, the kernel
``torch.compile`` fuses these into on the CPU). :func:`fuse_conv_activations` rewrites a traced
module to call it: the same float32 function (bit for bit on the models tested), with two passes
fewer per block. On 2 cores, CPU per image at batch 8 and 64: 4% and 11% less for ResNet-18, 6% and
19% less for ResNet-50 (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["fuse_conv_activations"]

log = logging.getLogger(__name__)

_RELUS = (torch.relu, torch.relu_, F.relu)
_ADDS = (operator.add, operator.iadd, torch.add)


class _FusedConv(nn.Module):
    """``relu(conv(x))``, or ``relu(conv(x) + residual)``, in one oneDNN call on ``conv``'s own
    parameters; ``residual`` is overwritten with the result when ``in_place``."""

    def __init__(self, conv: nn.Conv2d, in_place: bool = False) -> None:
        super().__init__()
        self.conv, self.in_place = conv, in_place

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        geometry = (list(c.padding), list(c.stride), list(c.dilation), c.groups)
        ops = torch.ops.mkldnn
        if residual is None:
            return ops._convolution_pointwise(x, c.weight, c.bias, *geometry, "relu", [], "")
        if self.in_place:
            return ops._convolution_pointwise_.binary(
                residual, x, c.weight, c.bias, *geometry, "add", None, "relu", [], None
            )
        return ops._convolution_pointwise.binary(
            x, residual, c.weight, c.bias, *geometry, "add", None, "relu", [], None
        )


@functools.cache
def _fusion_works() -> bool:
    """Whether this torch build has oneDNN's fused convolutions, and they compute what eager
    torch does (checked once per process on a tiny input)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            gen = torch.Generator().manual_seed(0)
            conv = nn.Conv2d(4, 4, 3, padding=1)
            x, r = (torch.randn(1, 4, 6, 6, generator=gen) for _ in range(2))
            fused = _FusedConv(conv)(x, r.clone())
            return torch.allclose(fused, torch.relu(conv(x) + r), atol=1e-5)
    except (RuntimeError, AttributeError) as exc:  # no such op in this build
        log.debug("oneDNN convolution fusion unavailable: %s", exc)
        return False


def fuse_conv_activations(module: nn.Module) -> fx.GraphModule | None:
    """``module``'s forward with each ``Conv2d`` whose output only feeds a ReLU, directly or
    through a residual add, run as one :class:`_FusedConv`; its parameters are ``module``'s own,
    and ``module`` is untouched. For inference in float32 on the CPU, after BatchNorm folding
    (:func:`~ssole_hub.runtimes.eager.fold_batchnorm`: its ``Identity`` layers are skipped).

    Returns ``None`` if oneDNN's fused convolutions are not available, ``module`` does not trace
    with ``torch.fx``, or nothing fuses.
    """
    if not _fusion_works():
        return None
    try:
        gm = fx.symbolic_trace(module)
    except Exception as e:  # fx raises many kinds; an untraceable model runs as it is
        log.debug("convolutions not fused: %s does not trace (%s)", type(module).__name__, e)
        return None
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = sum(_fuse_at(gm, node) for node in list(graph.nodes) if _is_relu(gm, node))
    if not fused:
        return None
    graph.lint()
    gm.recompile()
    return gm


def _fuse_at(gm: fx.GraphModule, relu: fx.Node) -> bool:
    """Fuse the ReLU node ``relu`` into the convolution before it (or before its add)."""
    source = relu.args[0]
    conv, residual = (source, None) if _is_conv(gm, source) else _conv_and_residual(gm, source)
    if conv is None:
        return False
    in_place = residual is not None and _may_overwrite(gm, residual, source)
    gm.add_submodule(conv.target, _FusedConv(gm.get_submodule(conv.target), in_place))
    args = (conv.args[0],) if residual is None else (conv.args[0], residual)
    with gm.graph.inserting_before(relu):
        call = gm.graph.call_module(conv.target, args)
    relu.replace_all_uses_with(call)
    for node in (relu, source, conv) if residual is not None else (relu, conv):
        gm.graph.erase_node(node)
    return True


def _may_overwrite(gm: fx.GraphModule, residual: fx.Node, add: fx.Node) -> bool:
    """Whether the sum may be written into ``residual``'s memory: a tensor made inside the
    module by a layer that returns new memory (or by a fused convolution, which returns memory
    that nothing reads any more), and read by nothing after ``add``."""
    fresh = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, _FusedConv)
    if residual.op != "call_module" or type(gm.get_submodule(residual.target)) not in fresh:
        return False
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    return all(position[user] < position[add] for user in residual.users if user is not add)


def _conv_and_residual(gm: fx.GraphModule, add: object) -> tuple[fx.Node | None, fx.Node | None]:
    """For ``conv(x) + residual`` (the sum used only by the ReLU), its conv and residual nodes."""
    if not (
        isinstance(add, fx.Node)
        and add.op == "call_function"
        and add.target in _ADDS
        and len(add.args) == 2
        and not add.kwargs
        and len(add.users) == 1
    ):
        return None, None
    a, b = add.args
    for conv, residual in ((a, b), (b, a)):
        if _is_conv(gm, conv) and isinstance(residual, fx.Node) and conv is not residual:
            return conv, residual
    return None, None


def _is_conv(gm: fx.GraphModule, node: object) -> bool:
    """A node calling a zero-padded 2-d convolution, called only there, whose only user is
    the next step."""
    if not (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1):
        return False
    conv = gm.get_submodule(node.target)
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and calls == 1
    )


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    return node.op == "call_function" and node.target in _RELUS and len(node.args) == 1
