"""GE, gather-excite (Hu, Shen, Albanie, Sun and Vedaldi, "Gather-Excite: Exploiting Feature
Context in Convolutional Neural Networks", NeurIPS 2018; the authors' code: hujie-frank/GENet,
Caffe prototxts)."""

import math

from torch import Tensor, nn
from torch.nn import functional as F

from attnbench.registry import register


@register("ge", aliases=("genet",), params=lambda c: 0)
class GatherExcite(nn.Module):
    """GE: a gate from context gathered over an extent, spread back over the map.

    Gather: GE-theta-minus (the default) averages, over the whole map (extent 0) or over windows of
    2e-1 pixels at stride e (extent e); GE-theta (`learned=True`) applies log2(e) depthwise 3x3
    stride-2 convs, each followed by BN, with ReLU between them. Excite: nearest upsampling back to
    the map's size, sigmoid, out = x * gate. The authors' parametric model gathers globally with a
    depthwise conv as large as the map, which a gate built from its channel count alone cannot
    size, so learned gathering takes a finite extent (2, 4 or 8); their figures leave the
    upsampling unnamed, and nearest is timm's choice. The depthwise convs take Caffe's MSRA init.
    """

    def __init__(self, channels: int, *, extent: int = 0, learned: bool = False):
        super().__init__()
        if extent not in (0, 2, 4, 8) or (learned and not extent):
            raise ValueError(f"extent must be 0 (global; not with learned=true), 2, 4 or 8, not {extent}")
        self.extent = extent
        steps = int(math.log2(extent)) if learned else 0
        layers: list[nn.Module] = []
        for i in range(steps):
            conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            layers += [conv, nn.BatchNorm2d(channels)] + ([nn.ReLU()] if i < steps - 1 else [])
        self.gather = nn.Sequential(*layers) if learned else None

    def forward(self, x: Tensor) -> Tensor:
        if self.gather is not None:
            context = self.gather(x)
        elif self.extent:
            context = F.avg_pool2d(x, 2 * self.extent - 1, stride=self.extent, padding=self.extent - 1,
                                   count_include_pad=False)
        else:
            return x * x.mean((2, 3), keepdim=True).sigmoid()
        return x * F.interpolate(context, size=x.shape[2:], mode="nearest").sigmoid()
