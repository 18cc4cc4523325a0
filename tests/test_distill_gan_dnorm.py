"""`evcli distill-gan` with the BatchNorm PatchGAN (`disc_norm: batch`, the release's `--norm batch` of the U-Net
setting): parameters counted by hand (and the InstanceNorm one unchanged), real and fake batches judged apart (never
mixed in one BatchNorm batch) while the InstanceNorm path keeps its single call, tiny runs of both tasks, the
teacher-file norm mismatch named in one line, and the recipe key's values."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from evcli.engine.method import Modules
from evcli.errors import RecipeError
from evcli.methods.distill_gan.method import judge_real_fake
from evcli.methods.distill_gan.networks import NLayerDiscriminator, discriminator_norm
from evcli.recipe import resolve_recipe
from evcli.testing import run_cli

TINY = ["-r", "distill-gan/tiny"]  # CycleGAN, 32 px, batch 2, ndf 8, mobile ResNet generators (no BatchNorm)
PIX2PIX = ["-r", "distill-gan/tiny_pix2pix"]  # the same on the Pix2Pix task (D on 6 channels)
BATCH = ["--set", "distill-gan.disc_norm=batch"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@contextmanager
def spy(kind: type[nn.Module], keep: Callable[[nn.Module], bool] = lambda m: True) -> Iterator[list[tuple]]:
    """Records (batch size, training mode) of every call of a ``kind`` module (``keep`` filters) in this process."""
    calls: list[tuple] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if isinstance(module, kind) and keep(module):
            calls.append((args[0].shape[0], module.training))

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# parameters by hand


def test_batchnorm_patchgan_parameters_by_hand():
    """ndf 64 on 6 channels: biases on the first and the last conv only, BatchNorm scale and shift at 128-512."""
    convs = 6 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 1 * 16
    biases = 64 + 1  # first conv (no norm after it) and last conv
    bn = 2 * (128 + 256 + 512)
    d = NLayerDiscriminator(6, 64, norm="batch")
    assert _params(d) == convs + biases + bn == 2_768_705
    with_bias = [n for n, m in d.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert with_bias == ["model.0", "model.11"]
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in norms] == [128, 256, 512] and all(m.affine and m.track_running_stats for m in norms)
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in d.modules())
    scales = torch.cat([m.weight for m in norms]).detach()
    assert abs(float(scales.mean()) - 1) < 0.005 and abs(float(scales.std()) - 0.02) < 0.005  # N(1, 0.02)
    assert discriminator_norm(d.state_dict()) == "batch"


def test_instance_patchgan_parameters_unchanged():
    """The default: InstanceNorm without affine or running statistics, every conv with a bias."""
    convs = 6 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 1 * 16
    biases = 64 + 128 + 256 + 512 + 1
    d = NLayerDiscriminator(6, 64)
    assert d.norm == "instance" and _params(d) == convs + biases == 2_767_809
    assert all(m.bias is not None for m in d.modules() if isinstance(m, nn.Conv2d))
    norms = [m for m in d.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 3 and not any(m.affine or m.track_running_stats for m in norms)
    assert not list(d.buffers()) and discriminator_norm(d.state_dict()) == "instance"
    with pytest.raises(ValueError, match="unknown discriminator norm 'group'"):
        NLayerDiscriminator(6, 8, norm="group")


# --------------------------------------------------------------------------------------------------
# real and fake judged apart


class Wrapper(nn.Module):
    """Stands for the DDP wrapper: counts the calls that go through it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.batches = module, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return self.module(x)


def _modules(d: nn.Module) -> tuple[Modules, Wrapper]:
    wrapper = Wrapper(d)
    return Modules({"D_A": wrapper}, {}, unwrap=lambda m: m.module), wrapper


def test_batchnorm_fake_predictions_do_not_depend_on_the_real_batch():
    torch.manual_seed(0)
    d = NLayerDiscriminator(6, 8, norm="batch").train()
    fake, real1, real2 = (torch.rand(2, 6, 32, 32) * 2 - 1 for _ in range(3))
    modules, wrapper = _modules(d)
    with spy(nn.BatchNorm2d) as calls:
        r1, f1 = judge_real_fake(modules, "D_A", real1, fake, True, fake_first=True)
    r2, f2 = judge_real_fake(modules, "D_A", 3 * real2, fake, True, fake_first=True)
    assert torch.equal(f1, f2) and not torch.allclose(r1, r2)
    assert {n for n, _ in calls} == {2}  # every BatchNorm saw 2 images, never the 4 of real + fake
    assert wrapper.batches == [2, 2]  # once through the wrapper per judgement, the other batch on the module
    assert torch.equal(f1, d(fake)) and torch.equal(r1, d(real1))  # = the fake batch alone
    _, f3 = judge_real_fake(modules, "D_A", real1, fake, True)  # the CycleGAN order: the real batch first
    assert torch.equal(f3, f1)


def test_instance_path_is_the_single_concatenated_call():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 8).train()
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    modules, wrapper = _modules(d)
    pred_real, pred_fake = judge_real_fake(modules, "D_A", real, fake, False, fake_first=True)
    before = d(torch.cat([real, fake]))  # what the discriminator step computed before disc_norm existed
    assert torch.equal(pred_real, before[:2]) and torch.equal(pred_fake, before[2:])
    assert wrapper.batches == [4]  # one call, through the wrapper
    assert torch.allclose(pred_fake, d(fake), atol=1e-6)  # per image: the real batch changes nothing


# --------------------------------------------------------------------------------------------------
# runs


def _is_patchgan_input(m: nn.Module) -> bool:
    """The first conv of a PatchGAN (4x4 stride 2 from the image; the tiny generators have 7x7 / 3x3 / 1x1)."""
    return isinstance(m, nn.Conv2d) and m.kernel_size == (4, 4) and m.in_channels in (3, 6)


def test_pix2pix_teacher_run_with_batchnorm_discriminator(tmp_path: Path):
    """3 steps: each step shows D the fake batch for G, then the fake and the real batch apart (BatchNorm in
    training mode, 2 images each); the checkpoint holds D's running statistics after those 9 updates."""
    with spy(nn.BatchNorm2d) as calls:
        r = run_cli(["distill-gan", "teacher", *PIX2PIX, *BATCH, "-o", str(tmp_path / "t"), "--json"])
    assert r.code == 0, r.stderr
    assert len(calls) == 3 * 3 * 3 and set(calls) == {(2, True)}  # 3 steps x 3 D calls x 3 BatchNorms
    ckpt = load_file(str(tmp_path / "t" / "checkpoints" / "last.safetensors"))
    d_state = {k[len("module.D_A.") :]: v for k, v in ckpt.items() if k.startswith("module.D_A.")}
    assert discriminator_norm(d_state) == "batch"
    for i, width in ((3, 16), (6, 32), (9, 64)):  # ndf 8
        assert int(d_state[f"model.{i}.num_batches_tracked"]) == 9
        assert d_state[f"model.{i}.running_mean"].shape == (width,)
        assert d_state[f"model.{i}.running_mean"].abs().sum() > 0 and not torch.equal(
            d_state[f"model.{i}.running_var"], torch.ones(width)
        )
    assert f"model.{2}.bias" not in d_state and "model.0.bias" in d_state and "model.11.bias" in d_state
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["trained_modules"]["D_A"] == _params(NLayerDiscriminator(6, 8, norm="batch"))


def test_pix2pix_teacher_run_with_instance_discriminator_keeps_one_call(tmp_path: Path):
    """The default: G's adversarial term on the fake batch (2), the D step on real + fake in one call (4)."""
    with spy(nn.Conv2d, _is_patchgan_input) as calls:
        r = run_cli(["distill-gan", "teacher", *PIX2PIX, "-o", str(tmp_path / "t"), "--json"])
    assert r.code == 0, r.stderr
    assert [n for n, _ in calls] == [2, 4] * 3


@pytest.fixture(scope="module")
def cyclegan_teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill_gan_dnorm")
    runs = {"batch": root / "batch", "instance": root / "instance"}
    with spy(nn.BatchNorm2d) as calls:
        r = run_cli(["distill-gan", "teacher", *TINY, *BATCH, "-o", str(runs["batch"]), "--json"])
    assert r.code == 0, r.stderr
    runs["batch_calls"] = calls  # type: ignore[assignment]
    r = run_cli(["distill-gan", "teacher", *TINY, "-o", str(runs["instance"]), "--json"])
    assert r.code == 0, r.stderr
    return runs


def test_cyclegan_teacher_run_never_mixes_real_and_fake(cyclegan_teachers: dict):
    # per step: G's adversarial terms (D_A, D_B on the fakes), then D_A and D_B each on the real and the pooled batch
    calls = cyclegan_teachers["batch_calls"]
    assert len(calls) == 3 * 6 * 3 and set(calls) == {(2, True)}


def test_student_with_a_batchnorm_teacher_file(cyclegan_teachers: dict, tmp_path: Path):
    """The frozen D_A from the file runs in eval mode (running statistics) on the student's batch alone."""
    with spy(nn.BatchNorm2d) as calls:
        r = run_cli(
            ["distill-gan", "student", *TINY, *BATCH, "--teacher", str(cyclegan_teachers["batch"])]
            + ["-o", str(tmp_path / "s"), "--json"]
        )
    assert r.code == 0, r.stderr
    assert len(calls) == 3 * 3 and set(calls) == {(2, False)}
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert "D_A" in report["frozen_modules"]


def test_online_student_judged_by_the_batchnorm_discriminator_alone(tmp_path: Path):
    """Online CycleGAN (1 teacher step, 1 student step, 1 teacher step): the student's adversarial term shows the
    trained D_A the student's batch alone, in training mode."""
    with spy(nn.BatchNorm2d) as calls:
        r = run_cli(["distill-gan", "student", *TINY, *BATCH, "-o", str(tmp_path / "s"), "--json"])
    assert r.code == 0, r.stderr
    assert len(calls) == (6 + 1 + 6) * 3 and set(calls) == {(2, True)}


@pytest.mark.parametrize(
    ("teacher", "recipe_norm", "message"),
    [
        ("batch", "instance", "holds a teacher discriminator with BatchNorm; this recipe's distill-gan.disc_norm is "
         "instance"),
        ("instance", "batch", "holds a teacher discriminator with InstanceNorm; this recipe's distill-gan.disc_norm "
         "is batch"),
    ],
)  # fmt: skip
def test_teacher_discriminator_norm_mismatch_is_one_line(
    cyclegan_teachers: dict, tmp_path: Path, teacher: str, recipe_norm: str, message: str
):
    r = run_cli(
        ["distill-gan", "student", *TINY, "--set", f"distill-gan.disc_norm={recipe_norm}"]
        + ["--teacher", str(cyclegan_teachers[teacher]), "-o", str(tmp_path / "run")]
    )
    assert r.code == 3, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert f"set distill-gan.disc_norm={teacher}" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# the recipe key


def _resolve(*sets: str, file: str = "tiny_pix2pix"):
    from evcli.cli.common import shipped_recipes

    return resolve_recipe("distill-gan", recipe_file=shipped_recipes()[f"distill-gan/{file}"], sets=list(sets))


def test_shipped_recipes_disc_norm():
    from evcli.cli.common import shipped_recipes

    names = [n.split("/")[1] for n in shipped_recipes() if n.startswith("distill-gan/")]
    norms = {n: _resolve(file=n).method.disc_norm for n in names}
    assert norms.pop("crd_edges2shoes_unet") == "batch"  # the release's define_D(..., norm=opt.norm)
    assert norms and set(norms.values()) == {"instance"}
    assert _resolve("distill-gan.disc_norm=batch").method.disc_norm == "batch"
    with pytest.raises(RecipeError, match="expected one of 'instance', 'batch', got the string 'group'"):
        _resolve("distill-gan.disc_norm=group")


def test_cli_rejects_disc_norm_group_in_one_line(tmp_path: Path):
    r = run_cli(["distill-gan", "teacher", *PIX2PIX, "--set", "distill-gan.disc_norm=group", "-o", str(tmp_path)])
    assert r.code == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: recipe key 'distill-gan.disc_norm': expected one of 'instance', 'batch', got the string 'group' "
        "[from --set]"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("evcli: 1\ncommand: distill-gan\ndistill-gan:\n  disc_norm: group\n")
    r = run_cli(["recipe", "validate", str(bad)])
    assert r.code == 2 and "'distill-gan.disc_norm': expected one of 'instance', 'batch'" in r.stderr


def test_teacher_discriminator_width_mismatch_names_ndf(cyclegan_teachers: dict, tmp_path: Path):
    r = run_cli(
        ["distill-gan", "student", *TINY, "--set", "distill-gan.ndf=16"]
        + ["--teacher", str(cyclegan_teachers["instance"]), "-o", str(tmp_path / "run")]
    )
    assert r.code == 3, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "width (ndf) 8 on 3 input channels" in errors[0] and "ndf 16 on 3" in errors[0]
    assert "set distill-gan.ndf=8" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [TINY, PIX2PIX], ids=["cyclegan", "pix2pix"])
def test_two_processes_train_a_batchnorm_discriminator(recipe: list[str], tmp_path: Path):
    """DDP with a BatchNorm D: the two calls per step (one through the wrapper, one on the module) run under two
    processes and the checkpoint holds a finite D with its running statistics. Per-process batch statistics
    differ from one process at batch 2, so the weights are not compared with a single-process run."""
    from safetensors.torch import load_file

    from evcli.testing import launch_two_processes

    out = tmp_path / "ddp"
    r = launch_two_processes(["distill-gan", "teacher", *recipe, *BATCH, "-o", str(out), "--set", "data.batch_size=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    state = load_file(str(out / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("module.D_A.") and k.endswith("running_mean") for k in state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
