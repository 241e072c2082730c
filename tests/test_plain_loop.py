"""The harness-against-plain-loop benchmark (benchmarks/plain_loop.py): both loops train, and the
command prints both speeds, their ratio, and a warning when other processes took the CPU."""

from __future__ import annotations

import plain_loop
import pytest
import torch

from attnbench import data
from attnbench.config import preset
from attnbench.train import Runtime

CPU = Runtime(device=torch.device("cpu"), progress=False)


def test_both_loops_train_and_are_timed(splits: data.Splits, one_thread: None) -> None:
    cfg = preset("quick", depth=8, block="basic", batch_size=16)
    seen = []
    result = plain_loop.measure(cfg, splits, CPU, blocks=2, steps=2, warmup=1, workers=2,
                                on_block=lambda *args: seen.append(args))
    assert len(result.plain) == len(result.harness) == 2 and [b for b, *_ in seen] == [0, 1]
    assert min(result.plain + result.harness) > 0


def test_the_command_prints_both_speeds_the_ratio_and_a_load_warning(monkeypatch, capsys) -> None:
    def fake_measure(cfg, splits, rt, *, blocks, on_block, **_):
        assert (cfg.depth, cfg.block, cfg.batch_size, blocks) == (8, "basic", 16, 2)
        result = plain_loop.Speed([100.0, 110.0], [150.0, 170.0], [0.01, 0.5])
        for block in range(blocks):
            on_block(block, result.plain[block], result.harness[block], result.others[block])
        return result

    monkeypatch.setattr(plain_loop, "measure", fake_measure)
    assert plain_loop.main(["--depth", "8", "--dataset", "synthetic", "--batch-size", "16", "--blocks", "2", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "block 2/2: plain 110.0 img/s, harness 170.0 img/s, other processes 50% of the CPU" in out
    assert "plain loop: 105.0 img/s, harness: 160.0 img/s" in out and "harness / plain = 1.52x" in out
    assert "other processes took up to 50% of the CPU" in err


@pytest.mark.parametrize("args, needle", [(["--depth", "21"], "depth 21 is not valid"),
                                          (["--amp", "bf16"], "--amp bf16 needs a CUDA device")])
def test_the_command_rejects_bad_input_in_one_line(args, needle, capsys: pytest.CaptureFixture) -> None:
    assert plain_loop.main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
