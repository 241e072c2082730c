"""The baseline: the backbone with no attention, so every module is compared against it."""

from attnbench.registry import register

register("none", "plain ResNet, no attention (the baseline)", aliases=("baseline", "resnet"))
