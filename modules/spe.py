"""SPE, the seed's self-adaptive pooling module (published as SPEM, MMM 2023).

Global max and min pooling replace the usual average: both go through one per-channel affine
map (w2, b2), and a learned mix of the two (weights p_hat from two raw scalars per block)
drives a second gate. out = sigmoid(M' + m') * sigmoid(w1 * (p_hat0 M' + p_hat1 m') + b1) * x.
"""

import math

import torch
from torch import Tensor, nn

from attnbench.pooling import gate
from attnbench.registry import register


class SPEGate(nn.Module):
    """At init w1 = w2 = 0 and b1 = b2 = -1, so every block's attention is exactly
    sigmoid(-2) * sigmoid(-1) = 0.0321 whatever the input; p = (p0, p1) sets the initial mix.

    extra_loss() is alpha * sum(p^2): it pulls the magnitude of p towards 0, which makes the
    mix, which depends only on p0 : p1, increasingly sensitive as training goes on.
    """

    def __init__(self, channels: int, *, p0: float = 0.5, p1: float = 0.5, alpha: float = 0.1):
        super().__init__()
        shape = (1, channels, 1, 1)
        self.w1 = nn.Parameter(torch.zeros(shape))
        self.b1 = nn.Parameter(torch.full(shape, -1.0))
        self.w2 = nn.Parameter(torch.zeros(shape))
        self.b2 = nn.Parameter(torch.full(shape, -1.0))
        self.p = nn.Parameter(torch.tensor([p0, p1]))
        self.alpha = alpha

    def attention(self, high: Tensor, low: Tensor) -> Tensor:
        high = self.w2 * high + self.b2
        low = self.w2 * low + self.b2
        p_sq = self.p * self.p
        p_hat = p_sq / p_sq.sum()
        mix = self.w1 * (p_hat[0] * high + p_hat[1] * low) + self.b1
        return (high + low).sigmoid() * mix.sigmoid()

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False,
                before: nn.Module | None = None) -> Tensor:
        return gate(x, ["max", "min"], self.attention, residual=residual, relu=relu, before=before)

    def extra_loss(self) -> Tensor:
        return self.alpha * (self.p * self.p).sum()


def suggest_init(trial) -> dict[str, float]:
    """SPE's pooling initialisation as the tuner searches it. p0 and p1 enter the mix only
    through p0 : p1, while their magnitude and alpha set how fast the regulariser collapses p,
    so the search runs over the ratio, the magnitude and alpha, each on a log scale."""
    ratio = trial.suggest_float("p0_to_p1", 0.05, 20.0, log=True)  # max-pool : min-pool weight
    norm = trial.suggest_float("p_norm", 0.05, 5.0, log=True)  # |p|; the default is 0.707
    alpha = trial.suggest_float("alpha", 1e-3, 1.0, log=True)
    p1 = norm / math.hypot(ratio, 1.0)
    return {"p0": ratio * p1, "p1": p1, "alpha": alpha}


register(
    "spe",
    "self-adaptive pooling: learned mix of global max and min pooling gates the channels",
    gate=SPEGate,
    aliases=("spem", "spenet"),
    tunable=suggest_init,
)
