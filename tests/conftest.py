"""Shared fixtures: the real mini CIFAR-10 set beside the checkout, an isolated registry, and the
C kernels' check."""

import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from attnbench import fused, registry

# beside the checkout, as in the team's workspace; ATTNBENCH_MINI_CIFAR points elsewhere
MINI_CIFAR = Path(os.environ.get("ATTNBENCH_MINI_CIFAR")
                  or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-mini")


@pytest.fixture
def mini_cifar_dir() -> Path:
    """Folder holding cifar-10-batches-py/ with 4,000 train and 1,000 test real images."""
    if not (MINI_CIFAR / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the shared mini CIFAR-10 set is not at {MINI_CIFAR} (set ATTNBENCH_MINI_CIFAR)")
    return MINI_CIFAR


needs_kernels = pytest.mark.skipif(os.environ.get("ATTNBENCH_KERNELS") == "0", reason="kernels turned off")


def assert_trained_alike(got: tuple, want: tuple, *, grads_rel: float, buffers_rtol: float) -> None:
    """Two training runs' (output, {name: gradient}, {name: buffer}) agree: outputs elementwise,
    each gradient in relative L2 norm (robust to a ReLU input that rounds to 0 on one side only),
    each buffer elementwise."""
    (out, grads, buffers), (out_ref, grads_ref, buffers_ref) = got, want
    assert torch.allclose(out, out_ref, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        assert (grad - grads_ref[name]).norm() <= grads_rel * grads_ref[name].norm(), name
    for name, value in buffers.items():
        assert torch.allclose(value.double(), buffers_ref[name].double(), rtol=buffers_rtol, atol=1e-6), name


def onednn_weight_grad(x, dy, weight_shape: tuple, stride: int, padding: int):
    """torch's own (oneDNN's) weight gradient of a conv, which kernels.c's conv_weight_grad replaces."""
    weight = torch.zeros(weight_shape).to(memory_format=torch.channels_last)
    return torch.ops.aten.convolution_backward(dy, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


@pytest.fixture
def kernels_built_unless_turned_off() -> None:
    """CI has a C compiler: a test of the C kernels must not pass by running the torch path."""
    if os.environ.get("ATTNBENCH_KERNELS") != "0":
        assert fused.library() is not None


@pytest.fixture
def clean_registry():
    """Let a test register plugins without leaking them into other tests."""
    registry.available()
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)
    yield registry
    registry._REGISTRY.clear(); registry._REGISTRY.update(saved[0])
    registry._ALIASES.clear(); registry._ALIASES.update(saved[1])


def kill_a_worker_mid_trial(trials: Callable[[], list]) -> tuple:
    """Wait (up to 2 minutes) for a RUNNING trial that has reported an epoch and names its worker
    (host:pid); SIGKILL that worker. `trials` lists the study's trials ([] before it exists).
    Returns (the trial as it was, the pid)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.3)
        victim = next((t for t in trials() if t.state.name == "RUNNING" and "worker" in t.user_attrs
                       and len(t.intermediate_values) >= 1), None)
        if victim is not None:
            pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            return victim, pid
    raise AssertionError("no trial reached its first epoch")
