"""Squeeze-and-excitation (Hu et al., 2018): channel weights from the global average."""

from torch import Tensor, nn

from attnbench.pooling import gate
from attnbench.registry import register


class SEGate(nn.Module):
    """a = sigmoid(FC2(ReLU(FC1(GAP(x))))), out = a * x; FCs keep PyTorch's default init."""

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def attention(self, mean: Tensor) -> Tensor:
        return self.fc2(self.fc1(mean.flatten(1)).relu_()).sigmoid_().view_as(mean)

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False,
                before: nn.Module | None = None) -> Tensor:
        return gate(x, ["mean"], self.attention, residual=residual, relu=relu, before=before)


register("se", "squeeze-and-excitation: channel gate from global average pooling", gate=SEGate, aliases=("senet",))
