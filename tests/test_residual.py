"""A block's tail: its last layer adds the shortcut and applies the ReLU where it can, and the
models train to the same values and gradients as with the add and the ReLU as torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench import residual
from attnbench.models import build_model
from conftest import needs_kernels

pytestmark = pytest.mark.usefixtures("kernels_built_unless_turned_off")


def _train_step(module: str, arch: str, block: str, depth: int, fused_tail: bool, monkeypatch) -> tuple:
    """Output and parameter gradients of one step, and the autograd node each block's output came from."""
    torch.manual_seed(0)
    model = build_model(module, depth, 10, arch=arch, block=block).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    tails = []
    for stage in model.stages:
        for blk in stage:
            blk.register_forward_hook(lambda _, __, out: tails.append(type(out.grad_fn).__name__))
    takes = residual._takes
    with monkeypatch.context() as patch:
        # Without a fused tail the add and the ReLU are torch ops after the last layer, all else
        # alike. A norm folded into its gate sums in another order (test_pooling.py): not here.
        patch.setattr(residual, "_takes", lambda layer_type, *keywords: fused_tail and "before" not in keywords
                      and takes(layer_type, *keywords))
        if not fused_tail:
            patch.setattr(residual._AddReLU, "apply", lambda y, shortcut: torch.relu(y + shortcut))
        out = model(x)
        F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    return out.detach(), tails, {name: p.grad for name, p in model.named_parameters()}


# The node each block's output comes from when training on the CPU with the kernels: post-activation
# blocks end in the gate's or IEBN's Function, or in the last batch norm's; pre-activation blocks in
# the gate's, or in torch's add after their last conv.
TAIL = {"none": "_FusedBatchNormBackward", "se": "_FusedGateBackward", "spe": "_FusedGateBackward",
        "iebn": "_FusedIEBNBackward", "cbam": "_FusedChannelSpatialGateBackward"}
PREACT_TAIL = {**TAIL, "none": "AddBackward0", "iebn": "AddBackward0"}


@needs_kernels
@pytest.mark.parametrize("arch, block, depth", [("resnet", "bottleneck", 11), ("resnet", "basic", 8),
                                                ("preresnet", "bottleneck", 11)])
@pytest.mark.parametrize("module", sorted(TAIL))
def test_models_train_as_with_the_add_and_relu_as_torch_ops(module, arch, block, depth, monkeypatch) -> None:
    """Against the same model whose blocks end in torch's add and ReLU (the gates' other passes
    are compared with torch ops in test_pooling.py); the sums are the same in the same order."""
    out, tails, grads = _train_step(module, arch, block, depth, True, monkeypatch)
    out_ref, tails_ref, grads_ref = _train_step(module, arch, block, depth, False, monkeypatch)
    assert set(tails) == {(TAIL if arch == "resnet" else PREACT_TAIL)[module]}
    assert set(tails_ref) == {"ReluBackward0" if arch == "resnet" else "AddBackward0"}
    assert torch.allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.allclose(grad, grads_ref[name], rtol=1e-5, atol=1e-7), name


@needs_kernels
def test_add_relu_is_one_function_with_the_torch_gradient() -> None:
    y0, s0 = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    results = []
    for fused_path in (True, False):
        y, s = y0.clone().requires_grad_(), s0.clone().requires_grad_()
        out = residual.add(y, s, relu=True) if fused_path else torch.relu(y + s)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out))
        results.append((out, y.grad, s.grad))
        if fused_path:
            assert type(out.grad_fn).__name__ == "_AddReLUBackward"
    for got, want in zip(*results):
        assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(residual.add(y0, s0, relu=True), torch.relu(y0 + s0))
    assert torch.equal(residual.add(y0, s0, relu=False), y0 + s0)


class Spy(nn.Module):
    """A last layer that takes the residual itself, and says what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        self.calls.append((x, residual, relu))
        return x


def test_finish_without_layers_is_the_add() -> None:
    x, shortcut = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    assert torch.equal(residual.finish((nn.Identity(), nn.Identity()), x, shortcut, relu=True), torch.relu(x + shortcut))


def test_finish_hands_the_shortcut_to_the_last_layer_that_takes_it() -> None:
    x, shortcut = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    spy = Spy()
    scale = nn.Conv2d(2, 2, 1, bias=False)
    nn.init.dirac_(scale.weight)
    residual.finish((spy, nn.Identity()), x, shortcut, relu=True)  # an identity gate is skipped
    assert spy.calls[0][1] is shortcut and spy.calls[0][2] is True
    out = residual.finish((spy, scale), x, shortcut, relu=False)  # a last layer without it: the add
    assert len(spy.calls) == 2 and spy.calls[1][1] is None
    assert torch.allclose(out, x + shortcut)
