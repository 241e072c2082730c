"""The CUDA paths, each against the CPU path it stands in for: data kept on the GPU, every module's
train step, autocast, torch.compile, the cost table's memory columns, and the command line with
--gpus. Skipped where no GPU is visible; on a GPU machine the whole suite runs these too."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnbench import registry
from attnbench.config import preset
from attnbench.data import eval_batches, load_dataset, train_batches
from attnbench.costs import cost_table
from attnbench.models import build_model
from attnbench.train import Runtime, Stepper, train

from conftest import assert_trained_alike

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 rounds conv and matmul inputs to 10 mantissa bits; off, so float32 on the GPU can be
    held to the CPU's float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _step(module: str, device: torch.device, *, amp: str = "", compiled: bool = False, steps: int = 1):
    """`steps` SGD steps of a bottleneck ResNet-11 with `module`, from one initialisation, on one
    batch; returns (the last step's loss, {name: gradient}, {name: buffer}) on the CPU, and the
    stepper."""
    torch.manual_seed(0)
    model = build_model(module, 11, 10, "resnet", "bottleneck")
    stepper = Stepper.wrap(model, Runtime(device=device, compile=compiled), lr=0.1, momentum=0.9,
                           weight_decay=1e-4, amp=amp)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(
        device, memory_format=torch.channels_last)
    y = (torch.arange(16) % 10).to(device)
    for _ in range(steps):
        loss_sum, _ = stepper.run([(x, y)])
    grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
    buffers = {n: b.cpu() for n, b in model.named_buffers()}
    return (loss_sum.cpu() / len(y), grads, buffers), stepper


def test_batches_on_the_gpu_are_the_cpu_batches(mini_cifar_dir):
    cpu = load_dataset("cifar10", mini_cifar_dir, size=300)
    gpu = load_dataset("cifar10", mini_cifar_dir, size=300, device="cuda")
    assert gpu.train_images.is_cuda and gpu.eval_images.is_cuda
    pairs = [*zip(train_batches(cpu, 128, 3, 0, channels_last=True), train_batches(gpu, 128, 3, 0, channels_last=True)),
             *zip(eval_batches(cpu, 500), eval_batches(gpu, 500))]
    assert len(pairs) == 3 + 2
    for (x, y), (x_gpu, y_gpu) in pairs:
        assert x_gpu.is_cuda and x_gpu.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(x_gpu.cpu(), x) and torch.equal(y_gpu.cpu(), y)


@pytest.mark.parametrize("module", registry.available())
def test_a_train_step_on_the_gpu_matches_the_cpu(module):
    """One step on the GPU (cuDNN, TF32 off) against one on the CPU (oneDNN). Gradients to 1e-2 in
    norm: a ReLU input within rounding of 0 can fall on either side."""
    got, _ = _step(module, CUDA)
    want, _ = _step(module, torch.device("cpu"))
    assert_trained_alike(got, want, grads_rel=1e-2, buffers_rtol=1e-4)


@pytest.mark.parametrize("module", registry.available())
def test_bf16_autocast_trains_in_bf16_and_keeps_float32_state(module):
    (loss, grads, buffers), stepper = _step(module, CUDA, amp="bf16", steps=2)
    (loss32, _, _), _ = _step(module, CUDA, steps=2)
    assert torch.isfinite(loss) and abs(loss - loss32) <= 0.05 * loss32  # bf16 keeps 8 bits: a few percent
    assert all(p.dtype == torch.float32 for p in stepper.model.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert all(b.dtype == torch.float32 for n, b in buffers.items() if "running" in n)
    with stepper.autocast():
        assert stepper.forward(torch.zeros(2, 3, 32, 32, device=CUDA)).dtype == torch.bfloat16


def test_fp16_autocast_scales_the_loss_and_unscales_the_gradients():
    """The step's gradients, as SGD saw them, are float32's to fp16's precision: a scale left in
    them would make them 65536x too large. The scale keeps its first value: no step skipped."""
    (loss, grads, _), stepper = _step("spe", CUDA, amp="fp16")
    (loss32, grads32, _), _ = _step("spe", CUDA)
    assert stepper.scaler is not None and stepper.scaler.get_scale() == 2.0 ** 16
    assert abs(loss - loss32) <= 0.05 * loss32
    flat, flat32 = (torch.cat([g.flatten() for g in gs.values()]) for gs in (grads, grads32))
    assert (flat - flat32).norm() <= 0.05 * flat32.norm()


@pytest.mark.parametrize("module", ["spe", "cbam"])
def test_a_compiled_train_step_matches_eager(module):
    """Inductor's fused kernels sum in their own order: the stem's gradient, two steps in, came out
    1.7e-3 from eager's in norm for SPE (H100, torch 2.11), so 1e-2 as for the CPU comparison."""
    got, stepper = _step(module, CUDA, compiled=True, steps=2)
    want, _ = _step(module, CUDA, steps=2)
    assert isinstance(stepper.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert_trained_alike(got, want, grads_rel=1e-2, buffers_rtol=1e-4)


def test_a_run_trained_on_the_gpu_resumes_on_the_cpu(tmp_path):
    """The run key leaves the device out, so a checkpoint written on a GPU must go on on a CPU."""
    cfg = preset("quick", module="spe", epochs=2, train_size=256, batch_size=64, amp="")
    splits = load_dataset("synthetic", "unused", size=cfg.train_size)
    gpu_splits = load_dataset("synthetic", "unused", size=cfg.train_size, device=CUDA)

    trained_on_gpu = []

    def stop_after_first_epoch(record):
        trained_on_gpu.append(record)
        raise KeyboardInterrupt

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, gpu_splits, Runtime(device=CUDA, progress=False), checkpoint, on_epoch=stop_after_first_epoch)
    seen = []
    result = train(cfg, splits, Runtime(device=torch.device("cpu"), progress=False), checkpoint, on_epoch=seen.append)
    # the first epoch is the GPU's, replayed from the checkpoint (a restart would have retrained it)
    assert seen[0] == trained_on_gpu[0] and [r["epoch"] for r in seen] == [0, 1] and len(result.history) == 2
    weights = torch.load(checkpoint, weights_only=True)["model"]
    assert all(t.device.type == "cpu" and torch.isfinite(t.float()).all() for t in weights.values())


def test_the_cost_table_on_the_gpu_times_and_reports_cuda_memory():
    table = cost_table(["se", "spe"], depth=11, batch_size=32, device="cuda", channels_last=True,
                       warmup=1, repeats=3).set_index("module")
    assert table.attrs["device_name"] == torch.cuda.get_device_name(0)
    assert (table["train_images_per_s"] > 0).all() and (table["infer_images_per_s"] > 0).all()
    assert table.loc["none", "train_step_rel_none"] == 1.0
    # a step's peak above what was held holds at least what it saves for its backward pass
    assert (table["cuda_peak_bytes"] >= table["saved_bytes"]).all()
    cpu = cost_table(["se", "spe"], depth=11, batch_size=32, throughput=False).set_index("module")
    assert ((table["saved_bytes"] - cpu["saved_bytes"]).abs() <= 0.01 * cpu["saved_bytes"]).all()  # the same rule


def test_the_command_line_trains_on_a_gpu_with_bf16(tmp_path):
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), "--preset", "quick", "--train-size", "256",
                           "--epochs", "1", "--no-progress", "--modules", "spe", "--gpus", "0", "--workers", "2",
                           "--amp", "bf16", "--results-dir", str(results)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    runs = pd.read_csv(results / "runs.csv")
    assert sorted(runs["module"]) == ["none", "spe"] and set(runs["state"]) == {"COMPLETE"}
    assert "bf16" in (results / "leaderboard.md").read_text()
