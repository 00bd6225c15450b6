"""oneDNN convolutions fused with the add and ReLU after them: the same numbers as eager torch,
fused only where nothing else reads what they replace."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import fx, nn

from ssole_hub import FeatureExtractor
from ssole_hub.runtimes import conv_fusion
from ssole_hub.runtimes.conv_fusion import _FusedConv, fuse_conv_activations
from ssole_hub.runtimes.eager import inference_model


def fused_layers(gm: nn.Module) -> list[_FusedConv]:
    return [m for m in gm.modules() if isinstance(m, _FusedConv)]


@pytest.mark.parametrize(
    ("arch", "blocks"), [("ssole_resnet18", 8), ("ssole_resnet50", 16)], ids=["r18", "r50"]
)
def test_a_folded_resnet_runs_fused_with_the_same_numbers(arch, blocks):
    torch.manual_seed(0)
    backbone = timm.create_model(arch)
    for bn in (m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    model = inference_model(backbone).to(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_conv_activations(model.backbone)
    layers = fused_layers(fused)
    # Every ReLU has a convolution before it: one per block after its add, plus the others.
    convs_before_relu = {"ssole_resnet18": 17, "ssole_resnet50": 49}[arch]
    assert len(layers) == convs_before_relu
    # Block inputs made inside the module take their block's sum; the first block's input is
    # the max pool's output, so every block's add runs in place.
    assert sum(layer.in_place for layer in layers) == blocks
    x = torch.randn(3, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model.backbone(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(x, before)  # the input is never overwritten
    # The module it came from is untouched and shares its parameters with the fused one.
    assert not fused_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert layers[0].conv.weight is model.backbone.conv1.weight


class Block(nn.Module):
    """conv -> add -> relu, where the residual may be read again afterwards."""

    def __init__(self, reuse_residual: bool, residual_is_input: bool = False) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.reuse, self.from_input = reuse_residual, residual_is_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.from_input else self.pool(x)
        out = torch.relu(self.conv(x) + residual)
        return out + residual if self.reuse else out


@pytest.mark.parametrize(
    ("block", "in_place"),
    [
        (Block(reuse_residual=False), True),
        (Block(reuse_residual=True), False),  # read after the add: it must keep its values
        (Block(reuse_residual=False, residual_is_input=True), False),  # the caller's tensor
    ],
    ids=["fresh-residual", "residual-read-later", "residual-is-the-input"],
)
def test_the_sum_is_written_into_the_residual_only_when_nothing_reads_it_later(block, in_place):
    block.eval()
    fused = fuse_conv_activations(block)
    assert [layer.in_place for layer in fused_layers(fused)] == [in_place]
    x = torch.randn(2, 4, 8, 8)
    before = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), block(x), atol=1e-6, rtol=1e-6)
    assert torch.equal(x, before)


class SharedOutput(nn.Module):
    """A convolution whose output is used twice: the ReLU cannot absorb it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(y) + y


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return torch.relu(self.conv(x))
        return x


@pytest.mark.parametrize("module", [SharedOutput(), Untraceable(), nn.Conv2d(4, 4, 3)])
def test_modules_with_nothing_to_fuse_or_that_do_not_trace_give_none(module):
    assert fuse_conv_activations(module.eval()) is None


def test_the_extractor_runs_fused_on_the_cpu_in_float32_only(hub_folder):
    fp32 = FeatureExtractor.from_pretrained(hub_folder, device="cpu")
    bf16 = FeatureExtractor.from_pretrained(hub_folder, device="cpu", dtype="bfloat16")
    assert isinstance(fp32._run.backbone, fx.GraphModule) and fused_layers(fp32._run)
    assert not fused_layers(bf16._run)
    assert not fused_layers(fp32.model)  # the model users see is the plain one


def test_without_onednn_nothing_is_fused_and_the_extractor_runs_the_plain_model(
    hub_folder, monkeypatch
):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    conv_fusion._fusion_works.cache_clear()
    try:
        assert fuse_conv_activations(Block(reuse_residual=False).eval()) is None
        fx_plain = FeatureExtractor.from_pretrained(hub_folder, device="cpu")
        assert fx_plain._run is fx_plain.model
    finally:
        conv_fusion._fusion_works.cache_clear()
