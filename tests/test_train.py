"""The trainer: reproducibility, resume after a kill, divergence, and learning on real CIFAR images."""

from dataclasses import replace

import pytest
import torch

from attnbench import checkpoints
from attnbench.config import preset
from attnbench.data import load_dataset
from attnbench.train import Diverged, Runtime, Stepper, lr_at, train

CPU = Runtime(device=torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("quick", module="spe", epochs=3, milestones=(2,), train_size=384, batch_size=64)
    return cfg, load_dataset("synthetic", "unused", size=cfg.train_size)


def final_weights(path, cfg):
    return checkpoints.read(path, cfg.key())["model"]


def stop_after(epoch):
    """An on_epoch callback that interrupts the run once `epoch` (0-based) is checkpointed."""
    def stop(record):
        if record["epoch"] == epoch:
            raise KeyboardInterrupt
    return stop


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_is_the_papers():
    cfg = preset("paper")
    assert [lr_at(cfg, e) for e in (0, 80, 81, 121, 122, 163)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_recipe_line_reads_as_english():
    """The recipe heads tables and tuning lines: a count agrees with its noun, and a recipe
    without milestones says its learning rate is constant rather than decayed 'at []'."""
    paper = preset("paper")
    assert "164 epochs" in paper.recipe_text and "lr 0.1 x0.1 at [81, 122]" in paper.recipe_text
    one = replace(preset("quick"), epochs=1, milestones=())
    assert "1 epoch," in one.recipe_text and "lr 0.05 constant," in one.recipe_text
    assert "[]" not in one.recipe_text


def test_the_run_key_holds_only_what_changes_the_run():
    """gamma acts only at a milestone: without milestones it changes nothing, so not the key."""
    constant = preset("quick")
    assert not constant.milestones
    assert replace(constant, gamma=0.5).key() == constant.key()
    assert replace(constant, gamma=0.5).recipe_key() == constant.recipe_key()
    decayed = replace(constant, milestones=(1,))
    assert replace(decayed, gamma=0.5).key() != decayed.key() != constant.key()
    assert replace(constant, seed=1).key() != constant.key()


def test_same_seed_gives_bit_identical_weights(tiny, tmp_path):
    cfg, splits = tiny
    train(cfg, splits, CPU, tmp_path / "a.pt")
    train(cfg, splits, CPU, tmp_path / "b.pt")
    a, b = final_weights(tmp_path / "a.pt", cfg), final_weights(tmp_path / "b.pt", cfg)
    assert same_weights(a, b)
    c = tmp_path / "c.pt"
    train(replace(cfg, seed=1), splits, CPU, c)
    assert not torch.equal(final_weights(c, replace(cfg, seed=1))["fc.weight"], a["fc.weight"])


def test_resume_after_interruption_gives_the_same_final_weights(tiny, tmp_path):
    cfg, splits = tiny
    whole = train(cfg, splits, CPU, tmp_path / "whole.pt")

    ckpt = tmp_path / "killed.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, splits, CPU, ckpt, on_epoch=stop_after(0))
    assert len(checkpoints.read(ckpt, cfg.key())["history"]) == 1
    seen = []
    resumed = train(cfg, splits, CPU, ckpt, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [0, 1, 2]  # the restored epoch is re-reported, then two new ones
    assert same_weights(final_weights(tmp_path / "whole.pt", cfg), final_weights(ckpt, cfg))
    assert [r["eval_acc"] for r in resumed.history] == [r["eval_acc"] for r in whole.history]
    assert not list(tmp_path.glob("*.tmp"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensors' bytes, where torch.load notices nothing
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
@pytest.mark.parametrize("which, resumes_at", [("newest", 1), ("both", 0)])
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_still_ends_bit_identical(
        tiny, tmp_path, capsys, damage, which, resumes_at):
    """The newest file damaged: the run resumes from the previous epoch's file; both damaged: it
    restarts from epoch 0. Either way it ends where an undisturbed run ends, and nothing raises
    (a grid's attempt at the run is not used up)."""
    cfg, splits = tiny
    whole = train(cfg, splits, CPU, tmp_path / "whole.pt")
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, splits, CPU, ckpt, on_epoch=stop_after(1))
    assert [len(checkpoints.read(p, cfg.key())["history"]) for p in (ckpt, checkpoints.previous(ckpt))] == [2, 1]
    if damage is flip_a_byte:
        assert len(torch.load(ckpt, weights_only=True)["history"]) == 2  # torch itself would load it
    damaged = [ckpt] if which == "newest" else [ckpt, checkpoints.previous(ckpt)]
    for path in damaged:
        damage(path)
    capsys.readouterr()
    seen = []
    resumed = train(cfg, splits, CPU, ckpt, on_epoch=seen.append)
    assert len(seen) == 3 and [r["epoch"] for r in seen[resumes_at:]] == list(range(resumes_at, 3))
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "cannot be trusted" in line]) == len(damaged)
    assert ("resuming after epoch 1 from" in err) == (resumes_at == 1)
    assert len(list(tmp_path.glob("run.pt*.bad-*"))) == len(damaged)
    assert same_weights(final_weights(tmp_path / "whole.pt", cfg), final_weights(ckpt, cfg))
    assert [r["eval_acc"] for r in resumed.history] == [r["eval_acc"] for r in whole.history]


def test_a_checkpoint_of_another_run_is_moved_aside_not_loaded(tiny, tmp_path, capsys):
    cfg, splits = tiny
    ckpt = tmp_path / "x.pt"
    train(replace(cfg, epochs=1, seed=5), splits, CPU, ckpt)
    fresh = train(replace(cfg, epochs=1), splits, CPU, ckpt)
    assert "it belongs to another run" in capsys.readouterr().err
    assert len(fresh.history) == 1
    assert checkpoints.read(ckpt, replace(cfg, epochs=1).key())["history"] == fresh.history


def test_exploding_loss_raises_diverged(tiny):
    cfg, splits = tiny
    with pytest.raises(Diverged, match="training loss became"):
        train(replace(cfg, lr=1e38, epochs=1), splits, CPU)


def test_short_run_on_real_cifar_images_beats_chance(mini_cifar_dir):
    cfg = preset("quick", dataset="cifar10", epochs=3, lr=0.1)
    splits = load_dataset("cifar10", mini_cifar_dir)
    result = train(cfg, splits, CPU)
    print("mini CIFAR-10 test accuracy per epoch:", [r["eval_acc"] for r in result.history])
    assert result.best_acc > 25.0  # chance is 10%
    assert [r["lr"] for r in result.history] == [0.1, 0.1, 0.1]
    assert all(r["train_loss"] > 0 and r["seconds"] > 0 for r in result.history)


def test_run_after_run_in_one_process_stays_compiled(monkeypatch):
    """A worker compiles a new model for every run. Past torch's recompile limit on ResNet.forward
    (8 graphs by default, 1 here) the next model would run eagerly; with fullgraph=True, which
    the trainer asks for, that is an error instead, so this fails unless Stepper.wrap clears the
    compiler's caches first."""
    compile_, asked = torch.compile, []

    def compile(model, **kw):
        asked.append(kw)
        return compile_(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    for module in ("none", "se", "spe"):
        stepper = Stepper.build(preset("quick", module=module), 10, replace(CPU, compile=True))
        loss_sum, _ = stepper.run([(x, torch.arange(2))])
        assert torch.isfinite(loss_sum)
    assert asked == [{"fullgraph": True}] * 3
