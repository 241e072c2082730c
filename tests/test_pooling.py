"""The pooling helpers give the plain reductions' values and gradients, in the input's layout."""

from __future__ import annotations

import pytest
import torch

import attnbench.pooling
from attnbench.pooling import channel_max_and_mean, global_extremes, global_max, global_mean

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _distinct(shape: tuple[int, ...]) -> torch.Tensor:
    """A permutation of distinct values: no ties, so every max and min has one winner."""
    torch.manual_seed(0)
    n = torch.Size(shape).numel()
    return torch.randperm(n).double().reshape(shape) / 10


def _input(case: str) -> torch.Tensor:
    """The layouts the models make, and the corner cases of the layout test in pooling.py."""
    if case == "channel-slice":  # channels_last memory, but neither layout is contiguous
        x = _distinct((2, 9, 6, 7)).to(memory_format=torch.channels_last)[:, 2:7]
    else:
        corners = {"batch-1": (1, 5, 6, 7), "one-pixel": (2, 5, 1, 1), "one-channel": (2, 1, 6, 7)}
        x = _distinct(corners.get(case, (2, 5, 6, 7))).to(memory_format=LAYOUTS.get(case, torch.channels_last))
    return x.requires_grad_()


def _grad(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    outputs = fn(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), x)
    return grad


def _plain_channel_maps(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), dim=1)


HELPERS = {
    "mean": (global_mean, lambda x: x.mean((2, 3))),
    "max": (global_max, lambda x: x.flatten(2).max(2).values),
    "extremes": (global_extremes, lambda x: (x.flatten(2).min(2).values, x.flatten(2).max(2).values)),
    "channel-maps": (channel_max_and_mean, _plain_channel_maps),
}


@pytest.mark.parametrize("case", [*LAYOUTS, "batch-1", "one-pixel", "one-channel", "channel-slice"])
@pytest.mark.parametrize("name", HELPERS)
def test_training_values_and_gradients_match_plain_reductions(case: str, name: str) -> None:
    helper, reference = HELPERS[name]
    x = _input(case)
    got, want = helper(x), reference(x)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-12)
    weights = [torch.randn(w.shape, dtype=torch.double) for w in want]
    grad = _grad(helper, x, weights)
    assert torch.allclose(grad, _grad(reference, x, weights), rtol=1e-12)
    if case in LAYOUTS:
        # The gradient comes back in x's own layout or as a broadcast view (the mean's), so
        # adding it to the gate's gradient is a plain stream.
        assert grad.is_contiguous(memory_format=LAYOUTS[case]) or 0 in grad.stride()


def test_extremes_route_gradient_to_the_winning_pixels_only() -> None:
    x = _input("channels_last")
    low, high = global_extremes(x)
    (2 * low.sum() + 3 * high.sum()).backward()
    assert (x.grad != 0).sum() == 2 * 2 * 5
    flat, values = x.grad.flatten(2), x.detach().flatten(2)
    twos, threes = (torch.full((2, 5, 1), v, dtype=torch.double) for v in (2.0, 3.0))
    assert torch.equal(flat.gather(2, values.argmin(2, keepdim=True)), twos)
    assert torch.equal(flat.gather(2, values.argmax(2, keepdim=True)), threes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_tie_sends_the_whole_gradient_to_one_winner(layout: str) -> None:
    x = torch.zeros(1, 3, 4, 4, dtype=torch.double).to(memory_format=LAYOUTS[layout])
    x[:, :, 1, 2] = x[:, :, 3, 0] = 5.0  # two maxima per channel
    x.requires_grad_()
    global_max(x).sum().backward()
    per_channel = x.grad.flatten(2)
    assert torch.equal(per_channel.sum(2), torch.ones(1, 3, dtype=torch.double))
    assert torch.equal((per_channel != 0).sum(2), torch.ones(1, 3, dtype=torch.long))
    assert torch.equal(x.detach().flatten(2).gather(2, per_channel.argmax(2, keepdim=True)),
                       torch.full((1, 3, 1), 5.0, dtype=torch.double))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_autograd_the_plain_reductions_run(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_search(*args, **kwargs):
        raise AssertionError("the training path ran without autograd")

    monkeypatch.setattr(attnbench.pooling, "_values_at_peaks", no_search)
    x = _input(layout).detach()
    with torch.no_grad():
        low, high = global_extremes(x)
        assert torch.equal(low, x.amin((2, 3))) and torch.equal(high, x.amax((2, 3)))
        assert torch.equal(global_max(x), x.amax((2, 3)))
        assert torch.equal(global_mean(x), x.mean((2, 3)))
        assert torch.equal(channel_max_and_mean(x), _plain_channel_maps(x))
