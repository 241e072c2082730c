"""Shared fixtures: the real mini CIFAR-10 set beside the checkout, random images in memory, one
torch thread, an isolated registry, the README's example module as a plugin, and a comparison of
two training steps."""

import os
import re
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from attnbench import data, registry

# beside the checkout, as in the team's workspace; ATTNBENCH_MINI_CIFAR points elsewhere
MINI_CIFAR = Path(os.environ.get("ATTNBENCH_MINI_CIFAR")
                  or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-mini")


@pytest.fixture
def mini_cifar_dir() -> Path:
    """Folder holding cifar-10-batches-py/ with 4,000 train and 1,000 test real images."""
    if not (MINI_CIFAR / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the shared mini CIFAR-10 set is not at {MINI_CIFAR} (set ATTNBENCH_MINI_CIFAR)")
    return MINI_CIFAR


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small work on two OpenMP threads next to a busy neighbour on a 2-core machine waits a
    scheduler tick per op; one thread keeps such tests at seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def splits() -> data.Splits:
    """1,024 random training images (the first 100 also the test set), already in memory."""
    images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(1024) % 10
    return data.Splits("t", 10, images, labels, images[:100], labels[:100], "test", data.CIFAR_MEAN, data.CIFAR_STD)


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


@pytest.fixture
def clean_registry():
    """Let a test register plugins without leaking them into other tests."""
    registry.available()
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)
    yield registry
    registry._REGISTRY.clear(); registry._REGISTRY.update(saved[0])
    registry._ALIASES.clear(); registry._ALIASES.update(saved[1])


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def plain_se(clean_registry, tmp_path) -> str:
    """Registers the README's example module, SE written as a plugin author writes it, from a
    plugin file; returns its name."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    path = tmp_path / "plain_se.py"
    path.write_text(next(b for b in blocks if "@register" in b))
    clean_registry.load_plugin(path)
    return "my_se"


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
