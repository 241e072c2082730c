"""Pooling for attention modules, written so that training stays fast on the CPU.

A gate pools its input and multiplies the input by the result, so the input's gradient is the
sum of two full-size tensors: one from the multiply and one from the pooling. When the two come
in different memory layouts, adding them is a strided gather, not a stream: 13 ms instead of 2 ms
at (128, 64, 32, 32) on a 2-core CPU. For a channels_last input, ``x.mean((2, 3))`` and
``x.flatten(2).max(2)`` hand back an NCHW gradient, and ``amax`` shares the gradient among ties
with several full-size passes; the forms below hand it back in the input's own layout. Without
autograd (evaluation, and measure.py's counter, which therefore costs them like the plain forms)
they are the plain reductions.

With ties, a max or min sends its whole gradient to one of the tied elements (as ``max`` along a
dim does), where ``amax`` would split it. These forms were chosen and timed on the CPU; on CUDA
they are correct but untimed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def _training(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def global_mean(x: Tensor) -> Tensor:
    """Per-channel mean over height and width, shape (N, C). When training, a sum then a divide
    of the small result: sum's gradient is a broadcast view, mean's a new NCHW tensor."""
    if _training(x):
        return x.sum((2, 3)) / (x.shape[2] * x.shape[3])
    return x.mean((2, 3))


def _channels_last_view(x: Tensor) -> tuple[Tensor, int]:
    """x as (N, H, W, C) when that is a view of its memory, else x; and the channel dim."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1), 3
    return x, 1


def _pixels_by_channel(x: Tensor) -> tuple[Tensor, int]:
    """x as (N, H*W, C) or (N, C, H*W), whichever is a view of its memory, and the pixel dim."""
    view, channel_dim = _channels_last_view(x)
    return (view.flatten(1, 2), 1) if channel_dim == 3 else (x.flatten(2), 2)


def _values_at_peaks(x: Tensor, signs: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Per-channel values of x where sign * x peaks (sign -1: the min), gathered in one op, so
    the backward is one scatter into one zero tensor in x's layout. Max pooling over the whole
    image finds the positions fastest on the CPU; max/min along a dim take 2-3x longer, and each
    of them would scatter into a zero tensor of its own, amax's backward even compares every
    element with the result to share the gradient among ties."""
    pixels, dim = _pixels_by_channel(x)
    with torch.no_grad():
        where = torch.cat([F.max_pool2d(x if sign > 0 else x.neg(), x.shape[2:], return_indices=True)[1]
                           for sign in signs], dim=2).flatten(2)
    return pixels.gather(dim, where.transpose(1, 2) if dim == 1 else where).unbind(dim)


def global_max(x: Tensor) -> Tensor:
    """Per-channel max over height and width, shape (N, C)."""
    if not _training(x):
        return x.amax((2, 3))
    (high,) = _values_at_peaks(x, (1,))
    return high


def global_extremes(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (min, max) over height and width, each (N, C).

    Without autograd, amin and amax: two vectorised passes beat aminmax's one on the CPU, which
    reduces across the pixel dim element by element (14 ms against 2.8 ms for both at
    (128, 64, 32, 32) channels_last, 3.7 against 0.4 at (128, 256, 8, 8))."""
    if not _training(x):
        return x.amin((2, 3)), x.amax((2, 3))
    low, high = _values_at_peaks(x, (-1, 1))
    return low, high


def channel_max_and_mean(x: Tensor) -> Tensor:
    """Per-pixel max and mean over the channels, shape (N, 2, H, W) (CBAM's spatial maps).

    When training, the max is taken along a dim (its backward writes one value per pixel, where
    amax's compares every element with the result) and the mean is a sum then a divide, and both
    run on the view in x's layout, so their gradients come back in that layout."""
    if not _training(x):
        return torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), dim=1)
    view, dim = _channels_last_view(x)
    maps = torch.stack((view.max(dim).values, view.sum(dim) / x.shape[1]), dim=dim)
    return maps if dim == 1 else maps.permute(0, 3, 1, 2)
