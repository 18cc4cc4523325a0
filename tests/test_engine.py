"""The engine: bit-exact resume, kill-and-resume, NaN guard, LR schedule, method state in checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evcli.api import resume as prepare_resume
from evcli.api import train as run_training
from evcli.engine.optim import LRSchedule
from evcli.engine.trainer import Trainer
from evcli.errors import Interrupted, TrainingDiverged, UsageError
from evcli.io.checkpoint import read_metadata
from evcli.recipe import resolve_recipe
from evcli.testing import TINY_FLAGS, make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, size=16)


def _flags(folder: Path, out: Path, **extra: object) -> dict:
    flags = {
        **TINY_FLAGS,
        "data.path": str(folder),
        "data.batch_size": 4,
        "train.grad_accum": 2,
        "schedule.epochs": 3,
        "schedule.max_steps": None,
        "schedule.warmup": "2step",
        "train.ema": True,
        "train.ema_decay": 0.9,
        "model.drop_path": 0.1,
        "mix.method": "cutmix",
        "train.eval_every": "1ep",
        "out.dir": str(out),
    }
    flags.update(extra)
    return {k: v for k, v in flags.items() if v is not None}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _stop_at(monkeypatch: pytest.MonkeyPatch, step: int, how: str) -> None:
    """Make the engine stop after optimizer step ``step``: like Ctrl-C (saves) or like a kill (does not)."""
    original = Trainer._train_step

    def patched(self: Trainer, batches):  # noqa: ANN001
        out = original(self, batches)
        if self.ctx.step + 1 == step:
            if how == "interrupt":
                self._interrupt = True
            else:
                raise RuntimeError("simulated kill")
        return out

    monkeypatch.setattr(Trainer, "_train_step", patched)


def test_resume_after_interrupt_is_bit_exact(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    full = run_training(resolve_recipe("mix", flags=_flags(folder, tmp_path / "full")))
    assert full["steps"] == 9  # 24 images / batch 4 / accum 2 = 3 steps per epoch, 3 epochs

    with monkeypatch.context() as m:
        _stop_at(m, 4, "interrupt")  # mid-epoch 1
        with pytest.raises(Interrupted):
            run_training(resolve_recipe("mix", flags=_flags(folder, tmp_path / "split")))
    assert read_metadata(tmp_path / "split" / "checkpoints" / "last.safetensors")["step"] == 4
    recipe, ckpt = prepare_resume("mix", tmp_path / "split", {}, [], force=False)
    resumed = run_training(recipe, resume_from=ckpt)
    assert resumed["steps"] == 9
    _assert_identical(_weights(tmp_path / "full"), _weights(tmp_path / "split"))
    _assert_identical(
        load_file(str(tmp_path / "full" / "final_ema.safetensors")),
        load_file(str(tmp_path / "split" / "final_ema.safetensors")),
    )
    assert full["metrics"] == resumed["metrics"]
    # metrics.jsonl holds each step once, as the uninterrupted run's does
    steps = lambda p: [json.loads(x)["step"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(tmp_path / "split") == steps(tmp_path / "full")


def test_resume_after_kill_continues_from_last_checkpoint(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    flags = _flags(folder, tmp_path / "full", **{"train.ckpt_every": "2step", "train.ema": False})
    run_training(resolve_recipe("mix", flags=flags))
    with monkeypatch.context() as m:
        _stop_at(m, 6, "kill")
        with pytest.raises(RuntimeError, match="simulated kill"):
            run_training(resolve_recipe("mix", flags={**flags, "out.dir": str(tmp_path / "killed")}))
    assert read_metadata(tmp_path / "killed" / "checkpoints" / "last.safetensors")["step"] == 4
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.tmp"))
    recipe, ckpt = prepare_resume("mix", tmp_path / "killed", {}, [], force=False)
    run_training(recipe, resume_from=ckpt)
    _assert_identical(_weights(tmp_path / "full"), _weights(tmp_path / "killed"))


def test_resume_refuses_schedule_changes_without_force(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as m:
        _stop_at(m, 1, "interrupt")
        with pytest.raises(Interrupted):
            run_training(resolve_recipe("mix", flags=_flags(folder, tmp_path / "r")))
    with pytest.raises(UsageError, match="schedule.epochs"):
        prepare_resume("mix", tmp_path / "r", {"schedule.epochs": 5}, [], force=False)
    recipe, _ = prepare_resume("mix", tmp_path / "r", {"schedule.epochs": 5}, [], force=True)
    assert recipe.schedule.epochs == 5
    recipe, _ = prepare_resume("mix", tmp_path / "r", {"train.log_every": 5}, [], force=False)  # harmless
    assert recipe.train.log_every == 5


def test_nan_guard_stops_and_keeps_last_good_checkpoint(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from evcli.methods.mix.method import MixMethod

    original = MixMethod.training_step

    def poisoned(self, model, batch, ctx):  # noqa: ANN001
        out = original(self, model, batch, ctx)
        if ctx.step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MixMethod, "training_step", poisoned)
    flags = _flags(folder, tmp_path / "nan", **{"train.ckpt_every": "1step", "train.ema": False})
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*step 3\)"):
        run_training(resolve_recipe("mix", flags=flags))
    ckpt = tmp_path / "nan" / "checkpoints" / "last.safetensors"
    assert read_metadata(ckpt)["step"] == 3
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt)).values() if t.is_floating_point())


def test_run_folder_is_never_reused(folder: Path, tmp_path: Path):
    flags = _flags(folder, tmp_path / "once", **{"schedule.max_steps": 1})
    run_training(resolve_recipe("mix", flags=flags))
    before = (tmp_path / "once" / "final.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        run_training(resolve_recipe("mix", flags=flags))
    assert (tmp_path / "once" / "final.safetensors").read_bytes() == before


def test_checkpoint_carries_recipe_and_state(folder: Path, tmp_path: Path):
    run_training(resolve_recipe("mix", flags=_flags(folder, tmp_path / "c", **{"schedule.max_steps": 2})))
    meta = read_metadata(tmp_path / "c" / "checkpoints" / "last.safetensors")
    assert meta["kind"] == "training" and meta["step"] == 2
    assert meta["recipe"]["mix"]["method"] == "cutmix"
    tensors = load_file(str(tmp_path / "c" / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("state.optimizers.main.state.") and k.endswith("exp_avg") for k in tensors)
    assert any(k.startswith("ema.model.") for k in tensors)
    saved = (tmp_path / "c" / "resolved_recipe.yaml").read_text()
    assert "method: cutmix" in saved


@pytest.mark.parametrize("sched", ["cosine", "step", "constant"])
def test_lr_schedule_shapes(sched: str):
    cfg = resolve_recipe(
        "mix",
        sets=[
            f"schedule.sched={sched}",
            "schedule.warmup=10step",
            "schedule.warmup_lr=0.0",
            "schedule.min_lr=0.0",
            "schedule.milestones=[50%, 75%]",
        ],
    ).schedule
    s = LRSchedule(cfg, base_lr=1.0, total_steps=100, steps_per_epoch=10)
    lrs = [s.factor(i) for i in range(100)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    if sched == "cosine":
        assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
        assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    elif sched == "step":
        assert lrs[49] == 1.0 and lrs[50] == pytest.approx(0.1) and lrs[75] == pytest.approx(0.01)
    else:
        assert set(lrs[10:]) == {1.0}


def test_optimizer_steps_are_fused_and_bump_versions():
    """The engine's optimizers use torch's fused update where it applies, and a step still bumps the version
    counter of every parameter it wrote (fused kernels do not; version-keyed caches depend on it)."""
    from evcli.engine.optim import NamedOptimizer
    from evcli.recipe import OptimConfig, ScheduleConfig

    for name in ("sgd", "adamw"):
        used, unused = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
        opt = NamedOptimizer("main", [{"params": [used, unused]}], OptimConfig(name=name), ScheduleConfig(), 0.1, 10, 5)
        assert opt.optimizer.param_groups[0]["fused"] is True
        used.grad = torch.ones(4)
        before = (used._version, unused._version, used.detach().clone())
        opt.step()
        assert used._version > before[0] and unused._version == before[1]
        assert not torch.equal(used.detach(), before[2])
