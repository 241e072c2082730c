"""attnbench: compare attention modules on one shared CIFAR ResNet, with one recipe."""

__version__ = "0.1.0"
