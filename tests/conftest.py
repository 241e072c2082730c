"""Shared fixtures: the real mini CIFAR-10 set beside the checkout, and an isolated registry."""

from pathlib import Path

import pytest

from attnbench import registry

MINI_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-mini"


@pytest.fixture
def mini_cifar_dir() -> Path:
    """Folder holding cifar-10-batches-py/ with 4,000 train and 1,000 test real images."""
    if not (MINI_CIFAR / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the shared mini CIFAR-10 set is not at {MINI_CIFAR}")
    return MINI_CIFAR


@pytest.fixture
def clean_registry():
    """Let a test register plugins without leaking them into other tests."""
    registry.available()
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)
    yield registry
    registry._REGISTRY.clear(); registry._REGISTRY.update(saved[0])
    registry._ALIASES.clear(); registry._ALIASES.update(saved[1])
