"""Timing of the hot pieces: each module's own work on a stage-3-sized input.

Under the default --benchmark-disable each runs once as an ordinary test; with
--benchmark-enable they give timings to compare against the plain BN/identity cost.
"""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from attnbench import registry

SHAPE = (128, 256, 8, 8)  # ResNet-164 stage 3 at batch 128


def module_work(name: str) -> torch.nn.Module:
    """The gate a module adds to a block, or its norm (IEBN); `none` gives the plain BN it replaces."""
    spec = registry.get(name)
    if spec.gate is not None:
        return spec.make_gate(SHAPE[1], spec.make_stage(SHAPE[1], {}), {})
    return spec.make_norm(SHAPE[1], {})


@pytest.mark.benchmark(group="gate-forward")
@pytest.mark.parametrize("name", ["none", "se", "cbam", "iebn", "spe"])
def test_gate_forward(benchmark: BenchmarkFixture, name: str) -> None:
    module = module_work(name).train()
    x = torch.randn(SHAPE)
    out = benchmark(module, x)
    assert out.shape == x.shape
