"""Timing of the training hot path, and the harness-against-plain-loop benchmark's machinery.

Under the default --benchmark-disable each benchmark runs once as an ordinary test; with
--benchmark-enable they time one training step and one augmented batch.
"""

from __future__ import annotations

from itertools import count
from typing import Iterator

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from attnbench import data, speed
from attnbench.config import preset
from attnbench.train import Runtime, Stepper

CPU = Runtime(device=torch.device("cpu"), progress=False)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small work on two OpenMP threads next to a busy neighbour on a 2-core machine waits a
    scheduler tick per op; one thread keeps these tests at seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(1024) % 10
    return data.Splits("t", 10, images, labels, images[:100], labels[:100], "test", data.CIFAR_MEAN, data.CIFAR_STD)


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


def test_speed_measures_both_loops(splits: data.Splits, one_thread: None) -> None:
    cfg = preset("quick", depth=8, block="basic", batch_size=16)
    seen = []
    result = speed.measure(cfg, splits, CPU, blocks=2, steps=2, warmup=1, workers=2,
                           on_block=lambda *args: seen.append(args))
    assert len(result.plain) == len(result.harness) == 2 and [b for b, *_ in seen] == [0, 1]
    assert min(result.plain + result.harness) > 0


def test_speed_command_prints_both_speeds_the_ratio_and_a_load_warning(monkeypatch, capsys) -> None:
    def fake_measure(cfg, splits, rt, *, blocks, on_block, **_):
        assert (cfg.depth, cfg.block, cfg.batch_size, blocks) == (8, "basic", 16, 2)
        result = speed.Speed([100.0, 110.0], [150.0, 170.0], [0.01, 0.5])
        for block in range(blocks):
            on_block(block, result.plain[block], result.harness[block], result.others[block])
        return result

    monkeypatch.setattr(speed, "measure", fake_measure)
    assert speed.main(["--depth", "8", "--dataset", "synthetic", "--batch-size", "16", "--blocks", "2", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "block 2/2: plain 110.0 img/s, harness 170.0 img/s, other processes 50% of the CPU" in out
    assert "plain loop: 105.0 img/s, harness: 160.0 img/s" in out and "harness / plain = 1.52x" in out
    assert "other processes took up to 50% of the CPU" in err


@pytest.mark.parametrize("args, needle", [(["--depth", "21"], "depth 21 is not valid"),
                                          (["--amp", "bf16"], "--amp bf16 needs a CUDA device")])
def test_speed_command_rejects_bad_input_in_one_line(args, needle, capsys: pytest.CaptureFixture) -> None:
    assert speed.main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
