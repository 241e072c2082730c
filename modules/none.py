"""The baseline: the backbone without attention, against which every module is compared."""

from torch import nn

from attnbench.registry import register


@register("none", aliases=("baseline", "resnet"), params=lambda c: 0)
class NoAttention(nn.Identity):
    """Plain ResNet, no attention (the baseline)."""
