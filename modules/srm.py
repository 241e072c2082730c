"""SRM, style-based recalibration (Lee et al., "SRM: A Style-based Recalibration Module for
Convolutional Neural Networks", ICCV 2019; the authors' code:
hyunjaelee410/style-based-recalibration-module, models/recalibration_modules.py)."""

import torch
from torch import Tensor, nn

from attnbench.registry import register


@register("srm", params=lambda c: 4 * c)
class SRM(nn.Module):
    """SRM: a channel gate from each channel's style, its mean and standard deviation.

    t = [mean, std] over positions per channel, std = sqrt(var + 1e-5); z = w_0 mean + w_1 std
    with a (C, 2) weight initialised to 0 and no bias (channel-wise fully connected); out =
    sigmoid(BN(z)) * x. The authors' code takes the unbiased variance (over HW - 1 positions),
    which this follows; `unbiased=False` divides by HW. Their ImageNet recipe exempts SRM's
    parameters from weight decay; the harness's one recipe does not.
    """

    def __init__(self, channels: int, *, unbiased: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm2d(channels)
        self.unbiased = unbiased

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean((2, 3))
        std = (x.var((2, 3), unbiased=self.unbiased) + 1e-5).sqrt()
        z = self.weight[:, 0] * mean + self.weight[:, 1] * std
        return x * self.bn(z[:, :, None, None]).sigmoid()
