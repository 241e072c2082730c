"""Timing of the hot pieces: one training step, one augmented batch, and what each registered
module adds to a block, forward and backward.

Under the default --benchmark-disable each runs once as an ordinary test; with
`python -m pytest tests/test_benchmarks.py --benchmark-enable` they give timings to compare side by
side. Whole-model ratios between modules come from `run_bench.py --measure-only` instead, which
interleaves them.
"""

from __future__ import annotations

from itertools import count
import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture
from torch import nn

from attnbench import data, registry
from attnbench.config import preset
from attnbench.train import Runtime, Stepper

CPU = Runtime(device=torch.device("cpu"), progress=False)
STAGES = {"stage1": (128, 64, 32, 32), "stage3": (128, 256, 8, 8)}  # ResNet-164's block outputs at batch 128


@pytest.mark.benchmark(group="train-step")
def test_one_train_step_of_resnet8(benchmark: BenchmarkFixture, splits: data.Splits, one_thread: None) -> None:
    cfg = preset("quick", depth=8, block="basic", batch_size=32)
    stepper = Stepper.build(cfg, splits.num_classes, CPU)
    batch = next(data.train_batches(splits, cfg.batch_size, 0, cfg.seed, channels_last=CPU.channels_last))
    before = stepper.model.fc.weight.detach().clone()
    loss_sum, correct = benchmark(stepper.run, [batch])
    assert torch.isfinite(loss_sum) and 0 <= int(correct) <= cfg.batch_size
    assert not torch.equal(stepper.model.fc.weight, before)


@pytest.mark.benchmark(group="augment")
def test_one_augmented_batch_of_128(benchmark: BenchmarkFixture, splits: data.Splits, one_thread: None) -> None:
    stream = (batch for epoch in count() for batch in data.train_batches(splits, 128, epoch, 0, channels_last=True))
    x, y = benchmark(next, stream)
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (128,)


def block_end(name: str, channels: int) -> nn.Module:
    """A block's last norm and its gate, as the backbone builds them for the module: a batch norm
    and the gate, or the module's norm (IEBN) and no gate; `none` is the plain batch norm."""
    spec = registry.get(name)
    if spec.role == "norm":
        return spec.build(channels, {})
    return nn.Sequential(nn.BatchNorm2d(channels), spec.build(channels, {}, spec.build_shared(channels, {})))


@pytest.mark.benchmark(group="block-end", warmup=True, warmup_iterations=2)
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("name", registry.available())
def test_block_end_train_step(benchmark: BenchmarkFixture, name: str, stage: str) -> None:
    """Forward and backward of a block's last norm, the module's gate and relu(+ shortcut), in
    channels_last as the trainer runs it: what a module costs per block over `none`."""
    shape = STAGES[stage]
    end = block_end(name, shape[1]).train().to(memory_format=torch.channels_last)
    x, shortcut, dy = (torch.randn(shape).to(memory_format=torch.channels_last) for _ in range(3))
    x.requires_grad_()
    inputs = [x, *end.parameters()]
    grads = benchmark(lambda: torch.autograd.grad(torch.relu(end(x) + shortcut), inputs, dy))
    assert grads[0].shape == x.shape and all(g is not None for g in grads)
