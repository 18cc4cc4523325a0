"""`evcli distill-gan` with the Pix2Pix U-Net generator (`unet`, the CRD card's other Pix2Pix teacher / student):
structure and skip connections, parameters and MACs counted by hand (unet_256: 54.414 M parameters), the input-size
rule, the recipe keys, and the CLI end to end (U-Net teacher -> U-Net student -> eval -> export -> translate), with
the teacher-file mismatch named both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from evcli.errors import RecipeError
from evcli.methods.distill_gan.config import default_unet_depth
from evcli.methods.distill_gan.cost import count_cost
from evcli.methods.distill_gan.method import make_generator
from evcli.methods.distill_gan.networks import ResnetGenerator, UnetGenerator, describe_generator
from evcli.recipe import resolve_recipe
from evcli.testing import run_cli

PIX2PIX = ["-r", "distill-gan/tiny_pix2pix"]  # 32 px, widths 8 / 4: U-Net depth 5
UNET_TEACHER = ["--set", "distill-gan.teacher_arch=unet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------------------
# parameters and MACs by hand


def test_tiny_unet_parameters_by_hand():
    """ngf 4, 5 downsamplings: widths 4, 8, 16, 32, 32. Only the last transposed conv has a bias."""
    down = 3 * 4 * 16 + 4 * 8 * 16 + 8 * 16 * 16 + 16 * 32 * 16 + 32 * 32 * 16  # 4x4 convs, no bias
    down_bn = 2 * (8 + 16 + 32)  # levels 1-3 (not the outermost, not the innermost)
    up = 32 * 32 * 16 + 64 * 16 * 16 + 32 * 8 * 16 + 16 * 4 * 16 + (8 * 3 * 16 + 3)  # innermost first
    up_bn = 2 * (32 + 16 + 8 + 4)  # after every transposed conv but the outermost
    assert _params(UnetGenerator(4, 5)) == down + down_bn + up + up_bn == 65_835


def test_unet_256_has_pix2pix_54_414m_parameters():
    """unet_256 at ngf 64 (BatchNorm), by hand: widths 64, 128, 256, 512 x 5."""
    down = 3 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 4 * (512 * 512 * 16)
    down_bn = 2 * (128 + 256 + 512 + 512 + 512 + 512)
    # innermost 512 -> 512; three 1024 -> 512; 1024 -> 256; 512 -> 128; 256 -> 64; 128 -> 3 with bias
    up = 512 * 512 * 16 + 3 * (1024 * 512 * 16) + 1024 * 256 * 16 + 512 * 128 * 16 + 256 * 64 * 16 + 128 * 3 * 16 + 3
    up_bn = 2 * (512 + 512 + 512 + 512 + 256 + 128 + 64)
    g = UnetGenerator(64, 8)
    assert _params(g) == down + down_bn + up + up_bn == 54_413_955
    assert f"{_params(g) / 1e6:.3f}" == "54.414"  # the Pix2Pix code's printed "54.414 M" (a bias more would not be)
    assert describe_generator(g.state_dict()) == ("unet", 64, 8)


def _unet_macs_by_hand(ngf: int, depth: int, size: int) -> tuple[int, int]:
    """(torchprofile-convention, exact) MACs of a U-Net forward at ``size`` x ``size``, level by level."""
    widths = [ngf * min(2**i, 8) for i in range(depth)]
    tp = exact = 0
    for i, w in enumerate(widths):
        side = size // 2 ** (i + 1)  # this level's encoder output
        cin = 3 if i == 0 else widths[i - 1]
        conv = side * side * w * cin * 16
        tp, exact = tp + conv, exact + conv
        if 0 < i:
            tp += (2 * side) ** 2 * cin  # the LeakyReLU on this level's input (torchprofile 0.0.2 counts it)
        up_in = w if i == depth - 1 else 2 * w
        up_out = 3 if i == 0 else widths[i - 1]
        tp += (2 * side) ** 2 * up_out * up_in * 16  # output elements x in-channels x k^2
        exact += side * side * up_in * up_out * 16  # input elements x out-channels x k^2
    return tp, exact


def test_unet_macs_by_hand_transposed_convs_included():
    for ngf, depth, size in ((4, 5, 32), (4, 3, 24)):
        c = count_cost(UnetGenerator(ngf, depth), size)
        assert (c["macs"], c["macs_exact"]) == _unet_macs_by_hand(ngf, depth, size)


@pytest.mark.slow
def test_unet_256_macs_by_hand():
    # measured: torchprofile 0.0.4's profile_macs gives 18,145,343,488 for this network, i.e. this count plus the
    # 2,969,600 BatchNorm outputs that torchprofile >= 0.0.3 adds
    c = count_cost(UnetGenerator(64, 8), 256)
    assert (c["macs"], c["macs_exact"]) == _unet_macs_by_hand(64, 8, 256) == (18_142_373_888, 6_048_186_368)


# --------------------------------------------------------------------------------------------------
# structure


def test_unet_layers_norms_dropout_and_init():
    g = UnetGenerator(8, 8, dropout=0.5)
    kinds = [[type(m).__name__ for m in level] for level in (g.down[0], g.down[1], g.down[7], g.up[7], g.up[0])]
    assert kinds == [
        ["Conv2d"],  # outermost down: no activation, no norm
        ["LeakyReLU", "Conv2d", "BatchNorm2d"],
        ["LeakyReLU", "Conv2d"],  # innermost: no norm (1x1 at 256 px)
        ["ReLU", "ConvTranspose2d", "BatchNorm2d"],
        ["ReLU", "ConvTranspose2d", "Tanh"],
    ]
    assert [level[-1 if i in (0, 7) else -2].out_channels for i, level in enumerate(g.down)] == [8, 16, 32] + [64] * 5
    convs = {n: m for n, m in g.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))}
    assert len(convs) == 16
    assert all((m.kernel_size, m.stride, m.padding) == ((4, 4), (2, 2), (1, 1)) for m in convs.values())
    assert [n for n, m in convs.items() if m.bias is not None] == ["up.0.1"]  # pix2pix with BatchNorm
    assert g.down[1][0].negative_slope == 0.2
    # dropout 0.5 in the num_downs - 5 8ngf decoder levels between level 4 and the innermost
    drop = [i for i, level in enumerate(g.up) for m in level if isinstance(m, torch.nn.Dropout)]
    assert drop == [4, 5, 6] and g.up[4][-1].p == 0.5
    assert not any(isinstance(m, torch.nn.Dropout) for m in UnetGenerator(8, 8, dropout=0.0).modules())
    big = UnetGenerator(64, 8)
    w = torch.cat([level[1].weight.flatten() for level in big.down[1:]]).detach()
    bn = torch.cat([m.weight for m in big.modules() if isinstance(m, torch.nn.BatchNorm2d)]).detach()
    assert abs(float(w.std()) - 0.02) < 0.001  # N(0, 0.02)
    assert abs(float(bn.mean()) - 1) < 0.002 and abs(float(bn.std()) - 0.02) < 0.002  # N(1, 0.02), as pix2pix


def test_every_level_concatenates_its_encoder_output_first():
    g = UnetGenerator(4, 5).train()
    downs, ups = {}, {}
    for i in range(5):
        g.down[i].register_forward_hook(lambda m, a, out, i=i: downs.__setitem__(i, out.detach().clone()))
        g.up[i].register_forward_pre_hook(lambda m, a, i=i: ups.__setitem__(i, a[0].detach().clone()))
    y = g(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert y.shape == (2, 3, 32, 32) and y.abs().max() <= 1
    assert torch.equal(ups[4], downs[4])  # the innermost decoder reads the bottleneck alone
    for i in range(4):  # every other level: [encoder output at this level, decoder output from below]
        w = downs[i].shape[1]
        assert ups[i].shape[1] == 2 * w and torch.equal(ups[i][:, :w], downs[i])


def test_outermost_skip_carries_a_pixel_change_locally():
    """With the decoder cut below the outermost level, the output still follows the input, only through the
    outermost skip: one changed pixel moves only the outputs of the 4x4 conv + 4x4 transposed conv around it."""
    torch.manual_seed(0)
    g = UnetGenerator(4, 5).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        base = g(x)
        x2 = x.clone()
        x2[0, :, 16, 16] += 1.0
        full = (g(x2) - base).abs().sum(1)[0]
        assert float(full.max()) > 1e-4
        g.up[1][1].weight.zero_()
        g.up[1][2].running_mean.zero_()
        g.up[1][2].bias.zero_()  # the decoder below level 0 now outputs exactly 0
        cut_base = g(x)
        diff = (g(x2) - cut_base).abs().sum(1)[0]
    changed = (diff > 1e-7).nonzero()
    assert len(changed) > 0, "the outermost skip does not carry the input"
    assert int((changed - 16).abs().max()) <= 3


def test_input_size_must_divide_by_2_to_the_depth():
    g = UnetGenerator(4, 5)
    with pytest.raises(ValueError, match="divisible by 32, got 48x48"):
        g(torch.rand(1, 3, 48, 48))
    assert UnetGenerator(4, 4)(torch.rand(1, 3, 48, 16)).shape == (1, 3, 48, 16)
    with pytest.raises(ValueError, match="at least 2 downsamplings"):
        UnetGenerator(4, 1)
    assert [default_unet_depth(s) for s in (512, 256, 128, 64, 48, 32, 12)] == [8, 8, 7, 6, 4, 5, 2]


def test_describe_and_rebuild_round_trip():
    for g in (UnetGenerator(8, 5), ResnetGenerator(4, "resnet", 2), ResnetGenerator(8, "mobile_resnet", 3)):
        found = describe_generator(g.state_dict())
        again = make_generator(*found)
        assert type(again) is type(g) and again.state_dict().keys() == g.state_dict().keys()
    assert describe_generator(UnetGenerator(8, 5).state_dict()) == ("unet", 8, 5)


# --------------------------------------------------------------------------------------------------
# recipe keys


def _resolve(*sets: str, file: str = "tiny_pix2pix"):
    from evcli.cli.common import shipped_recipes

    return resolve_recipe("distill-gan", recipe_file=shipped_recipes()[f"distill-gan/{file}"], sets=list(sets))


def test_recipe_keys_depth_names_and_rules():
    r = _resolve("distill-gan.teacher_arch=unet", "distill-gan.student_arch=unet", "distill-gan.student_width=6")
    assert r.model.name == "unet_w6"  # no multiple-of-4 rule for the U-Net
    assert r.method.generator_spec("teacher", 32) == ("unet", 8, 5)
    assert r.method.generator_spec("student", 256) == ("unet", 6, 8)
    assert _resolve("distill-gan.stage=teacher", "distill-gan.teacher_arch=unet").model.name == "unet_w8"
    assert _resolve().model.name == "mobile_resnet_w4"
    assert r.method.unet_dropout == 0.0  # the CRD release trains its U-Nets without dropout
    with pytest.raises(RecipeError, match="must be divisible by 2\\*\\*distill-gan.unet_depth = 64 for the U-Net"):
        _resolve("distill-gan.teacher_arch=unet", "distill-gan.unet_depth=6")
    with pytest.raises(RecipeError, match="multiple of 4"):
        _resolve("distill-gan.teacher_arch=unet", "distill-gan.student_width=6")  # the student is a ResNet
    with pytest.raises(RecipeError, match="the card's Pix2Pix teacher"):
        _resolve("distill-gan.teacher_arch=unet", file="tiny")
    assert _resolve("distill-gan.student_arch=unet", file="tiny").model.name == "unet_w4"
    with pytest.raises(RecipeError, match="unet_depth' must be <= 8"):
        _resolve("distill-gan.student_arch=unet", "distill-gan.unet_depth=9")


def test_shipped_unet_recipe_carries_the_cards_settings():
    r = _resolve(file="crd_edges2shoes_unet")
    c = r.method
    assert c.generator_spec("teacher", r.data.img_size) == ("unet", 64, 8)  # unet_256
    assert c.generator_spec("student", r.data.img_size) == ("unet", 16, 8)
    assert (c.task, c.resolved("ndf"), c.resolved("gan_mode"), r.data.batch_size, r.data.img_size) == (
        "pix2pix", 128, "hinge", 4, 256,
    )  # fmt: skip
    assert c.unet_dropout == 0.0 and r.model.name == "unet_w16"
    assert c.resolved("relation_weights") == [2.5, 2.5, 2.5] and c.resolved("relation_reduce") == "sum"


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill_gan_unet")
    teacher, student = root / "teacher", root / "student"
    r = run_cli(["distill-gan", "teacher", *PIX2PIX, *UNET_TEACHER, "-o", str(teacher), "--json"])
    assert r.code == 0, r.stderr
    r = run_cli(
        ["distill-gan", "student", *PIX2PIX, *UNET_TEACHER, "--student-arch", "unet", "--teacher", str(teacher)]
        + ["-o", str(student), "--json"]
    )
    assert r.code == 0, r.stderr
    return {"root": root, "teacher": teacher, "student": student}


def test_unet_teacher_run(runs: dict[str, Path]):
    report = json.loads((runs["teacher"] / "report.json").read_text())
    assert report["model"] == "unet_w8" and set(report["trained_modules"]) == {"G_A", "D_A"}
    assert report["trained_modules"]["G_A"] == _params(UnetGenerator(8, 5))
    exported = load_file(str(runs["teacher"] / "final.safetensors"))
    assert exported["down.0.0.weight"].shape == (8, 3, 4, 4) and "up.1.2.running_var" in exported
    assert describe_generator(exported) == ("unet", 8, 5)
    # the engine evaluates in eval mode: the BatchNorm running statistics were trained, saved and restored
    assert not torch.equal(exported["down.1.2.running_mean"], torch.zeros(16))
    r = run_cli(["distill-gan", "eval", str(runs["teacher"]), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["psnr_vs_target"] == pytest.approx(report["metrics"]["psnr_vs_target"])
    # the pictures show the generator as exported (eval mode), not batch statistics of one image
    g = make_generator(*describe_generator(exported)).eval()
    g.load_state_dict(exported)
    png = np.asarray(Image.open(runs["teacher"] / "pictures" / "val_0_input_teacher_student.png"), np.float32) / 255
    shown_input, shown_output = (torch.from_numpy(png[:, c : c + 32]).permute(2, 0, 1)[None] for c in (0, 36))
    with torch.no_grad():
        output = (g(shown_input * 2 - 1) + 1) / 2
    assert float((output - shown_output).abs().max()) < 0.01  # the input was rounded to 8 bits in the picture


def test_unet_student_run_eval_export_translate(runs: dict[str, Path], tmp_path: Path):
    report = json.loads((runs["student"] / "report.json").read_text())
    assert report["model"] == "unet_w4" and list(report["trained_modules"]) == ["S"]
    assert set(report["frozen_modules"]) == {"G_A", "vgg"}
    assert report["trained_modules"]["S"] == _params(UnetGenerator(4, 5)) == report["cost_at_256"]["student"]["params"]
    assert report["cost_at_256"]["teacher"]["params"] == _params(UnetGenerator(8, 5))
    train = [json.loads(x) for x in (runs["student"] / "metrics.jsonl").read_text().splitlines()]
    assert all({"s_rows", "s_cols", "s_patch", "s_style"} <= set(m) for m in train if m["split"] == "train")
    out = tmp_path / "student.safetensors"
    r = run_cli(["distill-gan", "export", str(runs["student"]), "--which", "last", "-o", str(out), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["psnr_vs_teacher"] == pytest.approx(report["metrics"]["psnr_vs_teacher"])
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(img)
    r = run_cli(["distill-gan", "translate", str(img), "--weights", str(out), "-o", str(tmp_path / "o.png"), "--json"])
    assert r.code == 0, r.stderr  # 30 x 45 padded to 32 x 64 (2**5) for the depth-5 U-Net, cropped back
    result = json.loads(r.stdout)
    assert result["role"] == "student" and Image.open(result["output"]).size == (45, 30)
    assert Image.open(result["grid"]).size == (3 * 45 + 8, 30)  # input | teacher (U-Net) | student


def test_translate_pads_to_the_unet_multiple():
    from evcli.methods.distill_gan.infer import translate

    g = UnetGenerator(4, 5).eval()
    assert translate(g, torch.rand(3, 30, 45)).shape == (3, 30, 45)
    assert translate(ResnetGenerator(4, "mobile_resnet", 1).eval(), torch.rand(3, 30, 45)).shape == (3, 30, 45)


@pytest.mark.parametrize(
    ("teacher", "sets", "message"),
    [
        (
            "UNET",
            [],
            "holds a U-Net generator of width 8 with depth 5; this recipe's teacher is a mobile ResNet of width 8 "
            "with 2 blocks",
        ),
        (
            "RESNET",
            UNET_TEACHER,
            "holds a mobile ResNet generator of width 8 with 2 blocks; this recipe's teacher is a U-Net of width 8 "
            "with depth 5",
        ),
        ("UNET", [*UNET_TEACHER, "--set", "distill-gan.unet_depth=4"], "with depth 5; this recipe's teacher is a "),
        ("UNET", [*UNET_TEACHER, "--teacher-width", "16"], "teacher is a U-Net of width 16 with depth 5"),
    ],
)
def test_teacher_file_mismatch_is_named(
    runs: dict[str, Path], tmp_path: Path, teacher: str, sets: list[str], message: str
):
    if teacher == "RESNET":
        path = tmp_path / "resnet_teacher.safetensors"
        save_file(ResnetGenerator(8, "mobile_resnet", 2).state_dict(), str(path))
    else:
        path = runs["teacher"] / "final.safetensors"
    r = run_cli(["distill-gan", "student", *PIX2PIX, *sets, "--teacher", str(path), "-o", str(tmp_path / "run")])
    assert r.code == 3, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--teacher-arch", "unets"], "did you mean 'unet'"),
        (["--student-arch", "resnet"], "unknown --student-arch 'resnet'"),
        (["--set", "distill-gan.student_arch=unet", "--img-size", "48", "--set", "distill-gan.unet_depth=5"], "= 32"),
    ],
)
def test_bad_unet_input_is_one_line(tmp_path: Path, args: list[str], message: str):
    r = run_cli(["distill-gan", "student", *PIX2PIX, *args, "-o", str(tmp_path / "run")])
    assert r.code == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cost_command_counts_the_unets():
    args = ["distill-gan", "cost", *PIX2PIX, "--teacher-arch", "unet", "--student-arch", "unet"]
    r = run_cli([*args, "--size", "64", "--json"])
    assert r.code == 0, r.stderr
    c = json.loads(r.stdout)
    assert (c["teacher"]["arch"], c["teacher"]["depth"], c["student"]["width"]) == ("unet", 5, 4)
    assert c["student"]["params"] == _params(UnetGenerator(4, 5)) and c["student"]["input"] == "1x3x64x64"
    assert c["student"]["macs"] == _unet_macs_by_hand(4, 5, 64)[0]
    r = run_cli([*args, "--size", "48"])
    assert r.code == 2 and "--size 48 is not divisible by 32" in r.stderr
