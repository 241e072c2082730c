"""Timing of the hot pieces: each module's own work on a stage-3-sized input.

Under the default --benchmark-disable each runs once as an ordinary test; with
--benchmark-enable they give timings to compare against the plain BN/identity cost.
"""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from attnbench import fused, pooling, registry
from attnbench.train import keep_freed_memory
from conftest import onednn_weight_grad

SHAPE = (128, 256, 8, 8)  # ResNet-164 stage 3 at batch 128


@pytest.fixture(scope="module", autouse=True)
def trainer_allocator() -> None:
    """Time with the heap setting every CPU training run has (Stepper.wrap): without it each
    8 MiB tensor may be page-faulted in afresh, which doubled CBAM's gate step here."""
    keep_freed_memory()


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


@pytest.mark.benchmark(group="gate-train-step")
@pytest.mark.parametrize("path", ["fused", "torch-ops"])
@pytest.mark.parametrize("name", ["se", "cbam", "iebn", "spe"])
def test_gate_train_step(benchmark: BenchmarkFixture, name: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward of a module's work in channels_last, as the trainer runs it: the fused
    CPU path of attnbench.pooling.gate side by side with the same gate as torch ops."""
    if path == "torch-ops":
        monkeypatch.setattr(pooling, "_fusable", lambda x: False)
    module = module_work(name).train().to(memory_format=torch.channels_last)
    x, dy = (torch.randn(SHAPE).to(memory_format=torch.channels_last) for _ in range(2))
    x.requires_grad_()
    grads = benchmark(lambda: torch.autograd.grad(module(x), [x, *module.parameters()], dy))
    assert grads[0].shape == x.shape and all(g is not None for g in grads)


@pytest.mark.benchmark(group="conv-weight-grad")
@pytest.mark.parametrize("path", ["kernels.c", "onednn"])
@pytest.mark.parametrize("channels, size", [(16, 32), (64, 8)], ids=["stage1", "stage3"])
def test_conv_weight_grad(benchmark: BenchmarkFixture, path: str, channels: int, size: int) -> None:
    """A CIFAR ResNet 3x3 conv's weight gradient at batch 128: attnbench.models.conv's C kernel
    side by side with oneDNN's, which the layer replaces."""
    x, dy = (torch.randn(128, channels, size, size).to(memory_format=torch.channels_last) for _ in range(2))
    weight_grad = fused.conv_weight_grad if path == "kernels.c" else onednn_weight_grad
    args = (x, dy, 3, 1, 1) if path == "kernels.c" else (x, dy, (channels, channels, 3, 3), 1, 1)
    assert benchmark(weight_grad, *args).shape == (channels, channels, 3, 3)
