"""Timing of the hot pieces: each module's own work, on a stage-3-sized input unless a test says otherwise.

Under the default --benchmark-disable each runs once as an ordinary test; with
--benchmark-enable they give timings to compare against the plain BN/identity cost.
"""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from torch import nn

from attnbench import fused, norm, registry, residual
from attnbench.models.conv import Conv2d
from attnbench.train import keep_freed_memory
from conftest import needs_kernels, onednn_weight_grad

SHAPE = (128, 256, 8, 8)  # ResNet-164 stage 3 at batch 128


@pytest.fixture(scope="module", autouse=True)
def trainer_allocator() -> None:
    """Time with the heap setting every CPU training run has (Stepper.wrap): without it each
    8 MiB tensor may be page-faulted in afresh, which doubled CBAM's gate step here."""
    keep_freed_memory()


def module_work(name: str, channels: int = SHAPE[1]) -> torch.nn.Module:
    """The gate a module adds to a block, or its norm (IEBN); `none` gives the plain BN it replaces."""
    spec = registry.get(name)
    if spec.gate is not None:
        return spec.make_gate(channels, spec.make_stage(channels, {}), {})
    return spec.make_norm(channels, {})


@pytest.mark.benchmark(group="gate-forward")
@pytest.mark.parametrize("name", ["none", "se", "cbam", "iebn", "spe"])
def test_gate_forward(benchmark: BenchmarkFixture, name: str) -> None:
    module = module_work(name).train()
    x = torch.randn(SHAPE)
    out = benchmark(module, x)
    assert out.shape == x.shape


@pytest.mark.benchmark(group="gate-train-step")
@pytest.mark.parametrize("path", [pytest.param("fused", marks=needs_kernels), "torch-ops"])
@pytest.mark.parametrize("name", ["se", "cbam", "iebn", "spe"])
def test_gate_train_step(benchmark: BenchmarkFixture, name: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward of a module's work in channels_last, as the trainer runs it: the fused
    CPU path (attnbench.pooling.gate's, IEBN's own) side by side with the same work as torch ops."""
    if path == "torch-ops":
        monkeypatch.setattr(fused, "serves", lambda *tensors, params=(): False)
    module = module_work(name).train().to(memory_format=torch.channels_last)
    x, dy = (torch.randn(SHAPE).to(memory_format=torch.channels_last) for _ in range(2))
    x.requires_grad_()
    grads = benchmark(lambda: torch.autograd.grad(module(x), [x, *module.parameters()], dy))
    assert grads[0].shape == x.shape and all(g is not None for g in grads)
    assert ("Fused" in type(module(x).grad_fn).__name__) == (path == "fused")


@pytest.mark.benchmark(group="block-tail", warmup=True, warmup_iterations=3)
@pytest.mark.parametrize("path", [pytest.param("fused-tail", marks=needs_kernels), "torch-tail"])
@pytest.mark.parametrize("name", ["none", "se", "cbam", "iebn", "spe"])
def test_block_tail_train_step(benchmark: BenchmarkFixture, name: str, path: str) -> None:
    """Forward and backward of relu(work(x) + shortcut), the end of a post-activation block, at
    ResNet-164's first stage (where the tail's passes cost most): the module's work writing the
    add and the ReLU itself (none: torch's one-pass _add_relu) side by side with the add and the
    ReLU as torch ops after it."""
    shape = (128, 64, 32, 32)
    work = None if name == "none" else module_work(name, shape[1]).train().to(memory_format=torch.channels_last)
    params = [] if work is None else list(work.parameters())
    x, shortcut, dy = (torch.randn(shape).to(memory_format=torch.channels_last) for _ in range(3))
    x.requires_grad_()
    shortcut.requires_grad_()

    def tail() -> torch.Tensor:
        if path == "torch-tail":
            return torch.relu((x if work is None else work(x)) + shortcut)
        return residual.add(x, shortcut, relu=True) if work is None else work(x, residual=shortcut, relu=True)

    grads = benchmark(lambda: torch.autograd.grad(tail(), [x, shortcut, *params], dy))
    assert grads[0].shape == x.shape and all(g is not None for g in grads)
    ends_in = type(tail().grad_fn).__name__  # the fused tail is one Function; torch's ends in its ReLU
    assert (ends_in == "ReluBackward0") == (path == "torch-tail"), ends_in


# "fixed": a shape at which the C passes take next to nothing, so what is left is what a gate costs
# every block whatever its size (the attention's autograd, the fold's small ops, Python)
STAGES = {"stage1": (128, 64, 32, 32), "stage2": (128, 128, 16, 16), "stage3": (128, 256, 8, 8),
          "fixed": (2, 64, 8, 8)}


@pytest.mark.benchmark(group="norm-and-tail", warmup=True, warmup_iterations=3)
@pytest.mark.parametrize("caches", ["warm", "flushed"])
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("name", ["none", "se", "spe", "cbam"])
def test_norm_and_tail_train_step(benchmark: BenchmarkFixture, name: str, stage: str, caches: str) -> None:
    """Forward and backward of a ResNet-164 block's end as the trainer runs it on the CPU: the
    last batch norm, the module's gate (its norm folded in) and relu(+ shortcut); for `none`
    the C batch norm writing the add and the ReLU. What a gate module costs per block over
    `none`, at each stage's activation (33.5, 16.8 and 8.4 MB), and at a tiny one ("fixed").
    "flushed" writes 48 MB (more than this CPU's L3) before each round, as the block's convs
    do in a training step: the gate's small calls then cost what they cost there, 2-3x their
    warm time."""
    shape = STAGES[stage]
    bn = norm.BatchNorm2d(shape[1])
    gate = None if name == "none" else module_work(name, shape[1]).train()
    params = [*bn.parameters(), *([] if gate is None else gate.parameters())]
    x, shortcut, dy = (torch.randn(shape).to(memory_format=torch.channels_last) for _ in range(3))
    x.requires_grad_()

    def tail() -> torch.Tensor:
        return bn(x, residual=shortcut, relu=True) if gate is None else gate(x, residual=shortcut, relu=True,
                                                                               before=bn)

    def step() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(tail(), [x, *params], dy)

    if caches == "warm":
        grads = benchmark(step)
    else:
        evict = torch.empty(12 * 2**20)

        def flush() -> None:  # pedantic() would take a returned value as step's arguments
            evict.add_(1.0)

        grads = benchmark.pedantic(step, setup=flush, rounds=30, warmup_rounds=3)
    assert grads[0].shape == x.shape and all(g is not None for g in grads)
    if fused.library() is not None:  # the C path: for a gate, with the norm folded in (never run itself)
        norm_ran = []
        bn.register_forward_hook(lambda *_: norm_ran.append(True))
        assert "Fused" in type(tail().grad_fn).__name__ and bool(norm_ran) == (gate is None)


@pytest.mark.benchmark(group="batch-norm", warmup=True, warmup_iterations=3)
@pytest.mark.parametrize("path", [pytest.param("kernels.c", marks=needs_kernels), "torch"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "residual-relu"])
@pytest.mark.parametrize("channels, size", [(16, 32), (64, 8)], ids=["stage1", "stage3"])
def test_batch_norm_train_step(benchmark: BenchmarkFixture, path: str, with_residual: bool, channels: int, size: int,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward of a ResNet-20 batch norm with the ReLU after it (and a block's
    residual add before that) at batch 128: attnbench.norm's C path side by side with torch's
    batch norm followed by attnbench.residual.add, which the layer runs off the C path."""
    if path == "torch":
        monkeypatch.setattr(norm.BatchNorm2d, "_fusable", lambda self, x, residual: False)
    bn = norm.BatchNorm2d(channels)
    x, shortcut, dy = (torch.randn(128, channels, size, size).to(memory_format=torch.channels_last) for _ in range(3))
    x.requires_grad_()
    shortcut = shortcut.requires_grad_() if with_residual else None
    inputs = [x, bn.weight, bn.bias, *([shortcut] if with_residual else [])]
    grads = benchmark(lambda: torch.autograd.grad(bn(x, shortcut, relu=True), inputs, dy))
    assert all(g is not None for g in grads)
    assert ("Fused" in type(bn(x, shortcut, relu=True).grad_fn).__name__) == (path == "kernels.c")


@pytest.mark.benchmark(group="conv-weight-grad")
@pytest.mark.parametrize("path", [pytest.param("kernels.c", marks=needs_kernels), "onednn"])
@pytest.mark.parametrize("channels, size", [(16, 32), (64, 8)], ids=["stage1", "stage3"])
def test_conv_weight_grad(benchmark: BenchmarkFixture, path: str, channels: int, size: int) -> None:
    """A CIFAR ResNet 3x3 conv's weight gradient at batch 128: attnbench.models.conv's C kernel
    side by side with oneDNN's, which the layer replaces."""
    x, dy = (torch.randn(128, channels, size, size).to(memory_format=torch.channels_last) for _ in range(2))
    weight_grad = fused.conv_weight_grad if path == "kernels.c" else onednn_weight_grad
    args = (x, dy, 3, 1, 1) if path == "kernels.c" else (x, dy, (channels, channels, 3, 3), 1, 1)
    assert benchmark(weight_grad, *args).shape == (channels, channels, 3, 3)


CONV_PATHS = {"winograd": "_WinogradConvBackward", "weight-grad-in-c": "_ConvWithWeightGradInCBackward",
              "onednn": "ConvolutionBackward0"}


@pytest.mark.benchmark(group="conv3x3-train")
@pytest.mark.parametrize("path", [pytest.param(p, marks=needs_kernels) if p != "onednn" else p for p in CONV_PATHS])
@pytest.mark.parametrize("channels, size", [(16, 32), (64, 8)], ids=["stage1", "stage3"])
def test_conv3x3_train(benchmark: BenchmarkFixture, monkeypatch: pytest.MonkeyPatch, path: str, channels: int,
                       size: int) -> None:
    """A CIFAR ResNet 3x3 conv's forward, input and weight gradients at batch 128, by each of
    attnbench.models.conv's paths for it side by side: Winograd, the direct weight gradient in C
    with oneDNN's forward and input gradient, and oneDNN throughout."""
    if path == "weight-grad-in-c":
        monkeypatch.setattr(Conv2d, "_winograd", lambda self, x: False)
    layer = (Conv2d if path != "onednn" else nn.Conv2d)(channels, channels, 3, padding=1, bias=False)
    layer = layer.to(memory_format=torch.channels_last)
    x, dy = (torch.randn(128, channels, size, size).to(memory_format=torch.channels_last) for _ in range(2))
    x.requires_grad_()
    grads = benchmark(lambda: torch.autograd.grad(layer(x), [x, layer.weight], dy))
    assert all(g is not None for g in grads)
    assert type(layer(x).grad_fn).__name__ == CONV_PATHS[path]
