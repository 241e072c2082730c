"""The pooling helpers give the plain reductions' values and gradients, in the input's layout."""

from __future__ import annotations

import pytest
import torch

from attnbench.pooling import channel_max_and_mean, global_extremes, global_max, global_mean

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _input(layout: str) -> torch.Tensor:
    torch.manual_seed(0)
    # A permutation of distinct values: no ties, so every max and min has one winner.
    x = torch.randperm(2 * 5 * 6 * 7).double().reshape(2, 5, 6, 7) / 10
    return x.to(memory_format=LAYOUTS[layout]).requires_grad_()


def _grad(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    outputs = fn(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), x)
    return grad


def _plain_channel_maps(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), dim=1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "helper, reference",
    [
        (global_mean, lambda x: x.mean((2, 3))),
        (global_max, lambda x: x.flatten(2).max(2).values),
        (global_extremes, lambda x: (x.flatten(2).min(2).values, x.flatten(2).max(2).values)),
        (channel_max_and_mean, _plain_channel_maps),
    ],
    ids=["mean", "max", "extremes", "channel-maps"],
)
def test_training_values_and_gradients_match_plain_reductions(layout: str, helper, reference) -> None:
    x = _input(layout)
    got, want = helper(x), reference(x)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-12)
    weights = [torch.randn(w.shape, dtype=torch.double) for w in want]
    grad = _grad(helper, x, weights)
    assert torch.allclose(grad, _grad(reference, x, weights), rtol=1e-12)
    # The gradient comes back in x's own layout or as a broadcast view (the mean's), so adding it
    # to the gate's gradient is a plain stream.
    assert grad.is_contiguous(memory_format=LAYOUTS[layout]) or 0 in grad.stride()


def test_extremes_route_gradient_to_the_winning_pixels_only() -> None:
    x = _input("channels_last")
    low, high = global_extremes(x)
    (2 * low.sum() + 3 * high.sum()).backward()
    assert (x.grad != 0).sum() == 2 * 2 * 5
    flat = x.grad.flatten(2)
    assert torch.equal(flat.gather(2, x.detach().flatten(2).argmin(2, keepdim=True)), torch.full((2, 5, 1), 2.0, dtype=torch.double))
    assert torch.equal(flat.gather(2, x.detach().flatten(2).argmax(2, keepdim=True)), torch.full((2, 5, 1), 3.0, dtype=torch.double))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_autograd_the_direct_reductions_run(layout: str) -> None:
    x = _input(layout).detach()
    with torch.no_grad():
        low, high = global_extremes(x)
        assert torch.equal(low, x.amin((2, 3))) and torch.equal(high, x.amax((2, 3)))
        assert torch.equal(global_max(x), x.amax((2, 3)))
        assert torch.equal(global_mean(x), x.mean((2, 3)))
        assert torch.equal(channel_max_and_mean(x), _plain_channel_maps(x))
