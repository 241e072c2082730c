"""The residual add (and ReLU) that ends every ResNet block, and who makes it.

On the CPU a block's tail is memory-bound: the gate writes its output, the add reads it back with
the shortcut and writes the sum, and the ReLU reads and writes that once more. Two things cut those
passes when training on the CPU:

- a last layer whose forward takes ``residual`` and ``relu`` keywords (the gates built on
  attnbench.pooling, IEBN, and the backbone's own batch norm, attnbench.norm) adds the shortcut
  and applies the ReLU while it writes its output, so the output that the add would read back is
  never written;
- any other layer's output (a plugin's gate) goes through one fused add+ReLU (torch's
  ``_add_relu``) instead of an add and an in-place ReLU: 3.1 ms against 4.0 ms at ResNet-164's
  first stage, batch 128.

The same hand-over gives a norm inside a block the ReLU after it (with no shortcut). Anywhere
else (GPU, no autograd, compile) the tail is the add and the ReLU.
Like the fused gates, _AddReLU has no double backward (it raises), and torch's _add_relu clamps
+inf to the largest float where a ReLU keeps it.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnbench import fused


def add(y: Tensor, shortcut: Tensor | None, relu: bool) -> Tensor:
    """y + shortcut (if there is one), then a ReLU if `relu`."""
    if shortcut is None:
        return y.relu() if relu else y
    if relu and shortcut.shape == y.shape and (y.requires_grad or shortcut.requires_grad) and fused.serves(y, shortcut):
        return _AddReLU.apply(y, shortcut)
    out = y + shortcut
    return out.relu_() if relu else out


def finish(layers: Sequence[nn.Module], x: Tensor, shortcut: Tensor | None, relu: bool) -> Tensor:
    """layers applied to x, plus the shortcut (if any), then a ReLU if `relu`: a block's tail, or a
    conv and norm with the ReLU after them. The last layer that is not an nn.Identity (a gate, or a
    norm) adds the shortcut and applies the ReLU itself if its forward takes `residual` and `relu`;
    if it also takes `before`, it is handed the layer before it (the block's last norm, or in a
    pre-activation block its last conv) to apply first, so that a gate can fold a norm into its
    own passes (attnbench.pooling.gate)."""
    layers = [layer for layer in layers if not isinstance(layer, nn.Identity)]
    if not layers:  # e.g. a plugin's norm that is an identity, in a block without a gate
        return add(x, shortcut, relu)
    body, last = layers[:-1], layers[-1]  # not `*body, last = layers`: torch 2.11's compile makes body a tuple
    hand_over = {}
    if body and _takes(type(last), "residual", "relu", "before"):
        hand_over["before"] = body.pop()  # which the gate may fold (a norm) into its own passes
    for layer in body:
        x = layer(x)
    if _takes(type(last), "residual", "relu"):
        return last(x, residual=shortcut, relu=relu, **hand_over)
    return add(last(x), shortcut, relu)


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


@torch.compiler.assume_constant_result  # torch.compile calls it rather than tracing inspect (or a cache)
def _takes(layer_type: type, *keywords: str) -> bool:
    names = _FORWARD_PARAMETERS.get(layer_type)
    if names is None:
        names = _FORWARD_PARAMETERS[layer_type] = frozenset(inspect.signature(layer_type.forward).parameters)
    return all(keyword in names for keyword in keywords)


class _AddReLU(torch.autograd.Function):
    """relu(y + shortcut) in one pass (torch's _add_relu has no autograd formula of its own)."""

    @staticmethod
    def forward(ctx, y: Tensor, shortcut: Tensor) -> Tensor:
        out = torch.ops.aten._add_relu(y, shortcut)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        (out,) = ctx.saved_tensors
        d = torch.ops.aten.threshold_backward(grad, out, 0)
        return d, d
