"""One battery for every module the registry holds, built-in or plugin (the README's example
joins as `plugin`, examples/attnbench-simam as `example`): a module that fails any check is named
by the test's id. Each module is tried at the channel counts of ResNet-164's stages, with its
default options."""

import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnbench import registry
from attnbench.config import preset
from attnbench.costs import count_macs
from attnbench.data import load_dataset
from attnbench.models import build_model
from attnbench.train import Runtime, train
from conftest import assert_trained_alike

MODULES = [*registry.available(), "plugin", "example"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "attnbench-simam" / "attnbench_simam.py"
CHANNELS = (64, 128, 256)


class Unit(nn.Module):
    """One module as a block holds it: a gate with its stage's shared module, or a norm."""

    def __init__(self, spec: registry.ModuleSpec, channels: int):
        super().__init__()
        self.shared = spec.build_shared(channels, {})
        self.module = spec.build(channels, {}, self.shared)

    def forward(self, x: Tensor) -> Tensor:
        if self.shared is not None and hasattr(self.shared, "reset"):
            self.shared.reset()
        return self.module(self.module(x))  # twice: a stage-shared state carries into the second


@pytest.fixture
def spec(request) -> registry.ModuleSpec:
    name = request.param
    if name == "plugin":
        name = request.getfixturevalue("plain_se")
    elif name == "example":
        request.getfixturevalue("clean_registry").load_plugin(EXAMPLE)
        name = "simam"
    return registry.get(name)


def unit(spec: registry.ModuleSpec, channels: int = 64, seed: int = 0) -> Unit:
    torch.manual_seed(seed)
    return Unit(spec, channels)


def images(channels: int = 64, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(4, channels, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)


battery = pytest.mark.parametrize("spec", MODULES, indirect=True)


def depth(spec: registry.ModuleSpec) -> int:
    """One bottleneck block a stage, or two where a stage-shared state runs from block to block."""
    return 11 if spec.shared is None else 20


@battery
def test_output_keeps_shape_and_dtype(spec):
    for dtype in (torch.float32, torch.float64):
        x = images(dtype=dtype)
        out = unit(spec).to(dtype)(x)
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


@battery
def test_parameter_count_is_the_declared_formula(spec):
    assert spec.params is not None, f"module '{spec.name}' declares no params= in @register"
    for channels in CHANNELS:
        assert sum(p.numel() for p in spec.build(channels, {}, spec.build_shared(channels, {})).parameters()) \
            == spec.params(channels)
        if spec.shared is not None:
            assert spec.shared_params is not None
            assert sum(p.numel() for p in spec.build_shared(channels, {}).parameters()) == spec.shared_params(channels)


@battery
@pytest.mark.parametrize("arch", ["resnet", "preresnet"])
def test_every_parameter_learns_in_the_backbone(spec, arch):
    torch.manual_seed(0)
    model = build_model(spec.name, 20, 10, arch=arch)  # two blocks a stage: a shared state reaches the second
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_and_grads():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        extra = model.extra_loss()
        (loss if extra is None else loss + extra).backward()

    # One step first: a zero-initialised layer (CBAM's spatial BN, GC's last conv) blocks the
    # gradient of what comes before it at init.
    loss_and_grads()
    opt.step()
    loss_and_grads()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    # Each parameter of each kind learns somewhere: one block's ReLU may be dead (SE's hidden
    # units are 4 in the first stage), but not every block's.
    learns: dict[str, bool] = {}
    for name, p in model.named_parameters():
        kind = re.sub(r"stages\.\d+\.(\d+\.)?", "stages.", name)
        learns[kind] = learns.get(kind, False) or bool(p.grad.abs().sum() > 0)
    assert not [kind for kind, learned in learns.items() if not learned]


@battery
def test_forward_is_deterministic(spec):
    module, x = unit(spec), images()
    assert torch.equal(module(x), module(x))


@battery
def test_channels_last_gives_the_values_of_nchw(spec):
    module, x = unit(spec), images()
    nchw = module(x)
    last = module.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(last, nchw, rtol=1e-5, atol=1e-6)


@battery
def test_eval_mode_runs_on_what_training_left(spec):
    module, x = unit(spec), images()
    train_out = module(x)
    out = module.eval()(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        assert torch.equal(out, train_out)  # without batch statistics the modes compute alike


@battery
def test_bf16_autocast_forward_on_the_cpu(spec):
    module, x = unit(spec), images()
    full = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x)
    assert low.shape == x.shape and torch.isfinite(low).all()
    assert (low.float() - full).norm() <= 0.05 * full.norm()


@battery
def test_state_dict_round_trip(spec):
    a, b = unit(spec, seed=0), unit(spec, seed=1)
    for p in a.parameters():  # away from the initial values, which may not depend on the seed
        p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    x = images()
    a(x * 2 + 1)  # running statistics of their own, which eval mode then uses
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.eval()(x), b.eval()(x))


@battery
def test_macs_count_in_both_conventions(spec):
    model, base = build_model(spec.name, depth(spec), 10), build_model("none", depth(spec), 10)
    paper, full = count_macs(model, "paper"), count_macs(model, "full")  # an op without a rule raises
    assert count_macs(base, "paper") <= paper < full
    if spec.kind == "identity":
        assert full == count_macs(base, "full")
    else:  # every module computes something: the full count sees it
        assert full > count_macs(base, "full")


@battery
@pytest.mark.parametrize("arch", ["resnet", "preresnet"])
def test_compiles_to_one_graph_that_trains_as_eager(spec, arch):
    """--compile gives every module one speed path: torch.compile must see the whole model as one
    graph (fullgraph=True makes a graph break an error). aot_eager traces forward and backward
    as the default backend does, without its minutes of code generation."""
    results = []
    for compiled in (True, False):
        torch.manual_seed(0)
        model = build_model(spec.name, depth(spec), 10, arch=arch).to(memory_format=torch.channels_last)
        torch.compiler.reset()  # each model's graph from scratch, clear of the recompile limit
        forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
        out = forward(x)
        loss = F.cross_entropy(out, torch.arange(4))
        extra = model.extra_loss()
        (loss if extra is None else loss + extra).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
    assert_trained_alike(*results, grads_rel=1e-5, buffers_rtol=1e-6)


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", "unused", size=1024)


@battery
def test_a_short_run_on_synthetic_beats_chance_clearly(spec, synthetic):
    """64 steps of batch 32: chance is 10% of the 1,000 test images, give or take 1%."""
    cfg = preset("quick", module=spec.name, block="bottleneck", depth=depth(spec), epochs=2, train_size=1024,
                 batch_size=32, lr=0.05)
    result = train(cfg, synthetic, Runtime(device=torch.device("cpu"), progress=False))
    assert result.best_acc >= 20.0 and all(math.isfinite(h["train_loss"]) for h in result.history)
