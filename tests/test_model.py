"""ConvNet: output shapes for other kernels and classes, and the tutorial's channel bug fixed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.model import ConvNet, Normalized


@pytest.mark.parametrize("kernels, classes", [
    ((8,), 10),
    ((4, 8, 16), 10),
    ((16, 32), 10),
    ((16, 32), 3),
    ((32, 16), 47),  # fewer channels after more: the tutorial's hard-coded 16 would break here
])
@pytest.mark.parametrize("batch", [1, 5])
def test_output_shape(kernels, classes, batch):
    torch.manual_seed(0)
    model = ConvNet(kernels, classes)
    out = model(torch.rand(batch, 1, 28, 28))
    assert out.shape == (batch, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kernels", [(8,), (4, 8, 16), (16, 32), (32, 16)])
def test_each_block_takes_the_previous_blocks_channels(kernels):
    convs = [m for m in ConvNet(kernels).modules() if isinstance(m, nn.Conv2d)]
    assert [c.in_channels for c in convs] == [1, *kernels[:-1]]
    assert [c.out_channels for c in convs] == list(kernels)
    # each block halves 28x28 (28 -> 14 -> 7 -> 3), and the linear layer sees exactly what is left
    side = 28 >> len(kernels)
    assert ConvNet(kernels).fc.in_features == side * side * kernels[-1]


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = ConvNet((16, 32)).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = ConvNet((4, 8, 16), 10)
    nn.functional.cross_entropy(model(torch.rand(3, 1, 28, 28)), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_normalized_takes_unit_range_images():
    torch.manual_seed(0)
    model = ConvNet((8,)).eval()
    wrapped = Normalized(model, mean=0.2860, std=0.3530).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model((x - 0.2860) / 0.3530))
