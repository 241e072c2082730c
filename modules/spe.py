"""SPE, self-adaptive pooling (the seed's SPENet, published as SPEM, "Self-adaptive Pooling
Enhanced attention Module", MMM 2023)."""

import math

import torch
from torch import Tensor, nn

from attnbench.registry import register


def suggest_init(trial) -> dict[str, float]:
    """SPE's pooling initialisation as the tuner searches it. p0 and p1 enter the mix only
    through p0 : p1, while their magnitude and alpha set how fast the regulariser collapses p,
    so the search runs over the ratio, the magnitude and alpha, each on a log scale."""
    ratio = trial.suggest_float("p0_to_p1", 0.05, 20.0, log=True)  # max-pool : min-pool weight
    norm = trial.suggest_float("p_norm", 0.05, 5.0, log=True)  # |p|; the default is 0.707
    alpha = trial.suggest_float("alpha", 1e-3, 1.0, log=True)
    p1 = norm / math.hypot(ratio, 1.0)
    return {"p0": ratio * p1, "p1": p1, "alpha": alpha}


@register("spe", aliases=("spem", "spenet"), tunable=suggest_init, params=lambda c: 4 * c + 2)
class SelfAdaptivePooling(nn.Module):
    """Self-adaptive pooling: a learned mix of global max and min pooling gates the channels.

    M' = w2 * max(x) + b2 and m' = w2 * min(x) + b2 per channel; p_hat = p^2 / sum(p^2) from two
    raw scalars per block; out = sigmoid(M' + m') * sigmoid(w1 * (p_hat0 M' + p_hat1 m') + b1) * x.
    At init w1 = w2 = 0 and b1 = b2 = -1, so every block's attention is exactly
    sigmoid(-2) * sigmoid(-1) = 0.0321 whatever the input; p = (p0, p1) sets the initial mix.
    extra_loss() is alpha * sum(p^2): it pulls the magnitude of p towards 0, which makes the mix,
    which depends only on p0 : p1, increasingly sensitive as training goes on.
    """

    def __init__(self, channels: int, *, p0: float = 0.5, p1: float = 0.5, alpha: float = 0.1):
        super().__init__()
        if p0 == p1 == 0 or alpha < 0:
            raise ValueError(f"p0 and p1 must not both be 0 (the mix is p^2 / |p|^2) and alpha must not be "
                             f"negative; got p0={p0}, p1={p1}, alpha={alpha}")
        shape = (1, channels, 1, 1)
        self.w1 = nn.Parameter(torch.zeros(shape))
        self.b1 = nn.Parameter(torch.full(shape, -1.0))
        self.w2 = nn.Parameter(torch.zeros(shape))
        self.b2 = nn.Parameter(torch.full(shape, -1.0))
        self.p = nn.Parameter(torch.tensor([p0, p1]))
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        high = self.w2 * x.amax((2, 3), keepdim=True) + self.b2
        low = self.w2 * x.amin((2, 3), keepdim=True) + self.b2
        p_sq = self.p * self.p
        p_hat = p_sq / p_sq.sum()
        mix = self.w1 * (p_hat[0] * high + p_hat[1] * low) + self.b1
        return x * ((high + low).sigmoid() * mix.sigmoid())

    def extra_loss(self) -> Tensor:
        return self.alpha * (self.p * self.p).sum()
