"""SimAM, a parameter-free attention (Yang, Zhang, Li and Xie, "SimAM: A Simple, Parameter-Free
Attention Module for Convolutional Neural Networks", ICML 2021; the authors' code: ZjjConan/SimAM).

An attnbench module from outside the project, as a third party ships one: installed as the
package around it, its entry point registers it; this file alone works with --plugin."""

from torch import Tensor, nn

from attnbench.registry import register


@register("simam", params=lambda c: 0)
class SimAM(nn.Module):
    """SimAM: each activation weighted by how far it stands out from the rest of its channel.

    d = (x - mean)^2 per position, over the channel's map; e = d / (4 (sum d / (HW - 1) + lambda))
    + 1/2, the inverse of the minimal energy the paper derives; out = x * sigmoid(e).
    """

    def __init__(self, channels: int, *, e_lambda: float = 1e-4):
        super().__init__()
        if not e_lambda > 0:
            raise ValueError(f"e_lambda must be positive, not {e_lambda}")
        self.e_lambda = e_lambda

    def forward(self, x: Tensor) -> Tensor:
        d = (x - x.mean((2, 3), keepdim=True)).pow(2)
        positions = x.shape[2] * x.shape[3] - 1
        e = d / (4 * (d.sum((2, 3), keepdim=True) / positions + self.e_lambda)) + 0.5
        return x * e.sigmoid()
