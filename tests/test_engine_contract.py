"""The engine contract (evcli/engine/method.py): modules with roles, the phase order (transform, calibrate),
named optimizers with their own schedules, methods that own their step, engine-owned evaluation over several
val sets, the NaN guard, and the bad input a method or a user can give it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evcli import api
from evcli.engine.trainer import Trainer, precision_of
from evcli.errors import MethodContractError, RecipeError, TrainingDiverged
from evcli.io.checkpoint import read_metadata
from evcli.testing import TINY_ARGS, launch_two_processes, run_cli
from evcli.testing.toy import ToyGAN, ToyQuant

HERE = Path(__file__).parent


def _recipe(command: str, out: Path, **flags: object):
    return api.resolve(command, flags={"out.dir": str(out), "train.log_every": 1, **flags})


def _records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_two_optimizers_in_two_processes_synchronise_every_trained_module(tmp_path: Path):
    out = tmp_path / "ddp"
    proc = launch_two_processes([str(out)], script=str(HERE / "toy_ddp_run.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the ranks saw different data (their local losses differ) ...
    assert ranks[0]["losses"] != ranks[1]["losses"]
    # ... yet every gradient each optimizer applied was identical on both ranks, for G and for D, every step
    g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
    assert len(g0) == len(g1) == 8  # 4 steps x (G, D)
    assert {e["optimizer"] for e in g0} == {"G", "D"}
    for a, b in zip(g0, g1):
        assert (a["step"], a["optimizer"]) == (b["step"], b["optimizer"])
        for ga, gb in zip(a["grads"], b["grads"]):
            assert ga is not None and torch.allclose(torch.tensor(ga), torch.tensor(gb), atol=1e-6)
    # the frozen teacher is in no checkpoint, export or parameter count; the report names its source
    ckpt = load_file(str(out / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("module.G.") for k in ckpt) and any(k.startswith("module.D.") for k in ckpt)
    assert not any("teacher" in k for k in ckpt)
    final = load_file(str(out / "final.safetensors"))
    assert set(final) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # G only (the weights module)
    report = json.loads((out / "report.json").read_text())
    assert report["frozen_modules"] == {"teacher": "random init (test)"}
    assert set(report["trained_modules"]) == {"G", "D"}
    assert report["parameters"] == sum(t.numel() for t in final.values())
    # val set "b" has 1 sample: rank 1 evaluated none of it, the summed metrics still count it exactly once
    assert report["tables"]["b/counts"]["values"] == 1 * 8 and math.isfinite(report["metrics"]["b/mse"])


def test_generator_loss_through_the_discriminator_leaves_no_gradient_on_it(tmp_path: Path):
    recipe = _recipe("toy-gan", tmp_path / "r", **{"schedule.max_steps": 2})
    t = Trainer(recipe, ToyGAN(recipe), None)
    t._setup_training()
    x, _ = next(iter(t.train_loader))
    g = t.raw_modules()
    loss = -g.unwrap("D")(g.G(x)).mean()
    t.step_optimizer("G", loss)
    assert all(p.grad is None for p in g.unwrap("D").parameters())  # only G's parameters got gradients
    assert all(p.grad is None for p in g.unwrap("G").parameters())  # G stepped and zeroed its own


def test_frozen_module_with_trainable_parameters_is_refused_by_name(tmp_path: Path):
    recipe = _recipe("toy-gan", tmp_path / "r")
    method = ToyGAN(recipe)
    method.frozen_teacher_grad = False
    with pytest.raises(MethodContractError, match="frozen module 'teacher' has parameters that require gradients"):
        api.train(recipe, method=method)
    assert not (tmp_path / "r").exists()


def test_unknown_optimizer_override_is_refused_with_the_methods_names(tmp_path: Path):
    recipe = api.resolve("toy-gan", flags={"out.dir": str(tmp_path / "r")}, sets=["optim.overrides.Dd.lr=0.1"])
    with pytest.raises(RecipeError, match=r"no optimizer named 'Dd' \(did you mean 'D'\?\)"):
        api.train(recipe)
    recipe = api.resolve("toy-gan", flags={"out.dir": str(tmp_path / "r")}, sets=["optim.overrides.D.lrr=0.1"])
    with pytest.raises(RecipeError, match="optim.overrides.D.lrr"):
        api.train(recipe)


def test_each_optimizer_follows_its_own_schedule(tmp_path: Path):
    run = tmp_path / "s"
    recipe = api.resolve(
        "toy-gan",
        flags={"out.dir": str(run), "train.log_every": 1, "schedule.epochs": 2},
        sets=[
            "optim.lr=0.1",
            "schedule.sched=cosine",
            "schedule.warmup=2step",
            "schedule.warmup_lr=0.0",
            "schedule.min_lr=0.0",
            "optim.overrides.D.lr=0.02",
            "optim.overrides.D.sched=linear",
            "optim.overrides.D.warmup=0step",
            "optim.overrides.D.decay_start=50%",
        ],
    )
    api.train(recipe)
    recs = _records(run, "train")
    total = 32  # 64 vectors / batch 4 = 16 steps per epoch, 2 epochs
    assert recs[-1]["step"] == total
    for r in recs:
        s = r["step"] - 1  # the lr a step used is set from the steps done before it
        g = 0.1 * s / 2 if s < 2 else 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 2) / (total - 2)))
        d = 0.02 if s < 16 else 0.02 * (1 - (s - 16) / 16)
        assert r["lr/G"] == pytest.approx(g, abs=1e-12) and r["lr/D"] == pytest.approx(d, abs=1e-12), r


def test_transform_calibrate_and_resume_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    full_recipe = _recipe("toy-quant", tmp_path / "full", **{"train.ckpt_every": "3step"})
    method = ToyQuant(full_recipe)
    api.train(full_recipe, method=method)
    assert method.calibrate_calls == 1 and method.calibrated_step > 0
    ckpt = load_file(str(tmp_path / "full" / "checkpoints" / "last.safetensors"))
    assert "module.model.0.step_size" in ckpt  # the swapped-in quantizer is part of the model's state

    original = Trainer._train_step

    def killed(self: Trainer, batches):  # noqa: ANN001
        out = original(self, batches)
        if self.ctx.step + 1 == 7:
            raise RuntimeError("simulated kill")
        return out

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_step", killed)
        with pytest.raises(RuntimeError, match="simulated kill"):
            api.train(_recipe("toy-quant", tmp_path / "killed", **{"train.ckpt_every": "3step"}))
    assert read_metadata(tmp_path / "killed" / "checkpoints" / "last.safetensors")["step"] == 6
    recipe, last = api.resume("toy-quant", tmp_path / "killed")
    resumed = ToyQuant(recipe)
    api.train(recipe, method=resumed, resume_from=last)
    assert resumed.calibrate_calls == 0  # a resumed run takes its calibration from the checkpoint
    a = load_file(str(tmp_path / "full" / "final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_runs_every_val_set_and_sums_exactly(tmp_path: Path):
    run = tmp_path / "e"
    report = api.train(_recipe("toy-quant", run, **{"schedule.max_steps": 2}))
    assert set(report["metrics"]) == {"a/mse", "b/mse"}
    again = api.evaluate(
        api.evaluation_recipe("toy-quant", run, None, {}, []), run / "checkpoints" / "last.safetensors"
    )
    assert again["metrics"] == report["metrics"]  # the checkpoint, transformed and loaded, scores the same
    # the method's export is its transformed model (with the learned step size): it loads after transform
    final = api.evaluate(api.evaluation_recipe("toy-quant", run, None, {}, []), run / "final.safetensors")
    assert final["metrics"] == report["metrics"]
    # the method's tables (not metrics) travel in both reports, per val set
    assert report["tables"] == final["tables"] == {"a/counts": {"values": 96}, "b/counts": {"values": 64}}
    loaded = api.load(run / "checkpoints" / "last.safetensors")
    x, y = loaded.trainer.method.build_data(loaded.trainer.ctx).val["b"][(0, 0)]
    assert loaded.model(x[None]).shape == (1, 8)


def test_nan_guard_never_names_a_checkpoint_holding_non_finite_weights(tmp_path: Path):
    """SGD at lr 20 blows the weights up: a checkpoint is written every step, and the run must stop before one
    holds inf/nan, naming the last good one."""
    run = tmp_path / "blow"
    args = [
        "mix",
        *TINY_ARGS,
        "--max-steps",
        "30",
        "--epochs",
        "10",
        "--set",
        "optim.name=sgd",
        "--lr",
        "20",
        "--set",
        "train.ckpt_every=1step",
        "--set",
        "mix.method=none",
        "-o",
        str(run),
    ]
    res = run_cli(args)
    assert res.code == 1, res.stderr
    assert "became" in res.stderr and "Last good checkpoint" in res.stderr
    ckpt = run / "checkpoints" / "last.safetensors"
    if ckpt.exists():
        assert f"(step {read_metadata(ckpt)['step']})" in res.stderr
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt)).values() if t.is_floating_point())


def test_loss_nan_in_an_owned_step_stops_before_any_update(tmp_path: Path):
    recipe = _recipe("toy-gan", tmp_path / "n", **{"train.ckpt_every": "1step"})
    recipe.method.nan_at_step = 3
    with pytest.raises(TrainingDiverged, match=r"loss of optimizer 'G' became nan at step 4.*\(step 3\)"):
        api.train(recipe)


def test_log_with_a_tracker_that_is_not_installed_names_the_package(tmp_path: Path):
    res = run_cli(["mix", *TINY_ARGS, "--log-with", "aim", "-o", str(tmp_path / "t")])
    assert res.code == 2 and "needs the 'aim' package" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["mix", *TINY_ARGS, "--log-with", "tensorbord", "-o", str(tmp_path / "t")])
    assert res.code == 2 and "did you mean 'tensorboard'" in res.stderr
    assert not (tmp_path / "t").exists()


def test_accelerate_launch_precision_is_honoured_unless_the_recipe_says_otherwise(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert precision_of(api.resolve("mix")) == ("bf16", "accelerate launch / accelerate config")
    assert precision_of(api.resolve("mix", flags={"train.mixed_precision": "no"})) == ("no", "flags")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert precision_of(api.resolve("mix")) == ("no", "default")


def test_a_command_may_replace_a_common_section():
    recipe = api.resolve("toy-gan", sets=["data.samples=32"])
    assert recipe.data.samples == 32 and not hasattr(recipe.data, "img_size")
    with pytest.raises(RecipeError, match="data.img_size"):
        api.resolve("toy-gan", sets=["data.img_size=32"])


def test_one_meaning_of_lr(tmp_path: Path):
    from evcli.recipe import effective_lr

    mix = api.resolve("mix", flags={"data.batch_size": 32})
    assert mix.optim.lr == 5e-4 and effective_lr(mix.optim, 4 * 32) == 5e-4  # as given, whatever the batch
    sparse = api.resolve("sparsify")
    assert sparse.optim.lr is None and effective_lr(sparse.optim, 512) == pytest.approx(0.2)  # 0.1 at 256
    typed = api.resolve("sparsify", flags={"optim.lr": 0.05})  # --lr is as given in every command
    assert typed.optim.lr_base is None and effective_lr(typed.optim, 512) == 0.05
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr_base: 1.0e-3\n  lr_base_batch: 512\n")
    scaled = api.resolve("mix", recipe_file=recipe)  # a recipe's lr_base beats the command's default lr
    assert scaled.optim.lr is None and effective_lr(scaled.optim, 1024) == pytest.approx(2e-3)
    recipe.write_text("optim:\n  lr: 1.0e-3\n  lr_base: 1.0e-3\n")
    with pytest.raises(RecipeError, match="both set"):
        api.resolve("mix", recipe_file=recipe)
    r = run_cli(["mix", *TINY_ARGS, "--lr", "0.1", "--lr-base", "0.1", "-o", str(tmp_path / "both")])
    assert r.code == 2 and "optim.lr and optim.lr_base are both set in flags" in r.stderr


def test_train_threads_sets_torch_threads(tmp_path: Path):
    from evcli.engine.trainer import Trainer
    from evcli.registry import get_command

    before = torch.get_num_threads()
    try:
        recipe = _recipe("toy-quant", tmp_path / "t", **{"train.threads": 1})
        Trainer(recipe, get_command("toy-quant").load_method_class()(recipe), None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
