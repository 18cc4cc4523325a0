"""`evcli deshadow` on photos a user brings (issue 14): the losses against hand-computed values, the learned
shadow detector, keeping the lit region, tiling, the labelled comparison, and the shipped weights on held-out
photos against the baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evcli.testing import run_cli

# --------------------------------------------------------------------------------------------------
# Losses on hand-made tensors


def test_gradient_loss_adds_the_x_and_y_terms_with_zero_padding():
    from evcli.methods.deshadow.losses import gradient_loss

    pred = torch.zeros(1, 1, 3, 3)
    pred[0, 0, 1, 1] = 1.0  # a single bright pixel: each Sobel response is the kernel itself (zero padded)
    target = torch.zeros(1, 1, 3, 3)
    # |Sobel_x| sums to 8 over 9 pixels, |Sobel_y| too: 8/9 + 8/9 (the old mean of both was 8/9)
    assert gradient_loss(pred, target).item() == pytest.approx(16 / 9, abs=1e-6)
    # zero padding sees a constant image's border: a 2x2 of ones gives Sobel_x = [[3, -3], [3, -3]] (edges
    # against the zero pad), the same for y: 3 + 3
    assert gradient_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(6.0, abs=1e-6)


def _fake_vgg() -> nn.Sequential:
    """27 layers where VGG16's ReLUs stand at 3, 8, 13, 20 (in place, like torchvision's) and layers 2 and
    26 (the last of slices 1 and 5) negate their input; everything else passes through."""
    layers: list[nn.Module] = [nn.Identity() for _ in range(27)]
    for i in (2, 26):
        neg = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            neg.weight.copy_(-torch.eye(3)[:, :, None, None])
        layers[i] = neg
    for i in (3, 8, 13, 20):
        layers[i] = nn.ReLU(inplace=True)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("post_relu, expected", [(False, 1.0 + 1.0 / 2.6), (True, 1.0)])
def test_perceptual_loss_levels_by_hand(post_relu: bool, expected: float):
    from evcli.methods.deshadow.losses import PerceptualLoss

    loss_fn = PerceptualLoss(_fake_vgg(), post_relu=post_relu)
    pred = torch.ones(1, 3, 4, 4, requires_grad=True)
    target = torch.zeros(1, 3, 4, 4)
    # level 0: L1 = 1 / 1.0; slice 1 ends at the negation: -1 vs 0 -> 1 / 2.6 (post-ReLU: 0 vs 0 -> 0); the
    # later slices start with the ReLU, so they see 0 vs 0
    loss = loss_fn(pred, target)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()  # no in-place ReLU rewrote a tensor autograd saved
    assert pred.grad is not None


@pytest.mark.parametrize("post_relu", [False, True])
def test_perceptual_last_level_stays_pre_relu(post_relu: bool):
    from evcli.methods.deshadow.losses import PerceptualLoss

    # pred = -1: slice 1 gives +1 (vs 0), which passes every ReLU; slice 5 negates it to -1 at its end, and
    # no later slice ReLUs it, so both variants compare -1 with 0 there: every level contributes 1 / divisor
    loss = PerceptualLoss(_fake_vgg(), post_relu=post_relu)(-torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    assert loss.item() == pytest.approx(sum(1 / d for d in (1.0, 2.6, 4.8, 3.7, 5.6, 0.15)), rel=1e-6)


def test_distillation_kl_by_hand():
    from evcli.methods.deshadow.losses import distillation_kl

    heavy = torch.zeros(1, 2)
    light = torch.tensor([[0.0, math.log(3.0)]])  # softmax: [1/4, 3/4]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distillation_kl([(heavy, light)]).item() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The detector


def test_ber_and_iou_by_hand():
    from evcli.methods.deshadow.detector import ber_iou, confusion_sums

    gt = torch.zeros(1, 4, 4)
    gt[:, :2] = 1  # 8 shadow pixels
    prob = torch.zeros(1, 4, 4)
    prob[:, :1] = 0.9  # 4 found
    prob[:, 3, :2] = 0.9  # 2 false alarms
    sums = confusion_sums(prob, gt)
    assert sums.tolist() == [4, 6, 2, 4]
    m = ber_iou(sums)
    assert m["ber"] == pytest.approx(100 * (1 - 0.5 * (4 / 8 + 6 / 8)))
    assert m["iou"] == pytest.approx(4 / 10)


@pytest.mark.parametrize("size", [(1, 1), (13, 17), (40, 24)])
def test_detector_runs_at_any_size(size: tuple[int, int]):
    from evcli.methods.deshadow.detector import ShadowDetector, detect_shadow

    net = ShadowDetector(8).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, *size)).shape == (2, 1, *size)
    det = detect_shadow(net, torch.rand(3, *size), work_size=16)  # every photo runs at the work size
    assert det.mask.shape == (1, *size) and set(det.mask.unique().tolist()) <= {0.0, 1.0}
    assert max(det.prob.shape[-2:]) == 16  # smaller ones enlarged, larger ones reduced: the training scale


def test_detector_warnings():
    from evcli.methods.deshadow.detector import Detection

    m = torch.zeros(1, 4, 4)
    assert Detection(m, m, 0.1, 0.0).warnings() == []
    assert "covers 50%" in Detection(m, m, 0.5, 0.0).warnings()[0]
    assert "unsure" in Detection(m, m, 0.1, 0.3).warnings()[0]


def _held_out(size: tuple[int, int] = (96, 72), seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A held-out package photo (skimage's coffee) with a rendered shadow: (shadow, free, mask)."""
    import torch.nn.functional as F

    from evcli.data.shadow import _photo_tensor, render_shadow

    photo = _photo_tensor("coffee", None)
    free = F.interpolate(photo[None], size=size[::-1], mode="bilinear", antialias=True)[0].clamp(0, 1)
    shadow, mask = render_shadow(free.permute(1, 2, 0).numpy(), np.random.default_rng(seed))
    return torch.from_numpy(shadow).permute(2, 0, 1).contiguous(), free, torch.from_numpy(mask)[None]


def test_shipped_detector_beats_otsu_on_a_held_out_photo_and_leaves_a_shadow_free_one_alone():
    from evcli.methods.deshadow.baselines import estimate_shadow_mask
    from evcli.methods.deshadow.detector import ber_iou, confusion_sums, detect_shadow
    from evcli.methods.deshadow.infer import load_detector

    detector = load_detector()
    learned, otsu = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for seed in (5, 6):  # at the shipped detector's working size (192 px)
        shadow, free, mask = _held_out(size=(192, 144), seed=seed)
        learned += confusion_sums(detect_shadow(detector, shadow).mask, mask)
        otsu += confusion_sums(estimate_shadow_mask(shadow), mask)
    assert ber_iou(learned)["ber"] < ber_iou(otsu)["ber"]
    assert ber_iou(learned)["iou"] > ber_iou(otsu)["iou"]
    assert detect_shadow(detector, free).fraction < 0.05


# --------------------------------------------------------------------------------------------------
# Keeping the lit region, tiling


class _Brighten(nn.Module):
    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (rgb * 1.5).clamp(0, 1)


class _Fails(nn.Module):
    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the network must not run on an empty mask")


def _remover(model: nn.Module):
    from evcli.methods.deshadow.infer import Remover

    return Remover(model, "test", "none", 0.9)


def test_keep_lit_keeps_far_pixels_and_takes_the_network_on_the_mask():
    from evcli.methods.deshadow.infer import KEEP_LIT_FEATHER, KEEP_LIT_MARGIN, remove_shadow

    rgb = torch.full((3, 64, 64), 0.4)
    mask = torch.zeros(1, 64, 64)
    mask[:, 24:40, 24:40] = 1
    kept = remove_shadow(_remover(_Brighten()), rgb, mask)
    paper = remove_shadow(_remover(_Brighten()), rgb, mask, keep_lit=False)
    assert torch.allclose(paper, torch.full_like(rgb, 0.6))  # --no-keep-lit: the network everywhere
    assert torch.allclose(kept[:, 24:40, 24:40], torch.full((3, 16, 16), 0.6))  # the mask: the network
    far = 24 - KEEP_LIT_MARGIN - KEEP_LIT_FEATHER - 1
    assert torch.equal(kept[:, :far], rgb[:, :far])  # lit pixels away from it: the input, exactly
    assert torch.equal(kept[:, 40 + KEEP_LIT_MARGIN + KEEP_LIT_FEATHER + 1 :], rgb[:, 40 + 16 :])
    ramp = kept[0, 32, 40 + KEEP_LIT_MARGIN : 40 + KEEP_LIT_MARGIN + KEEP_LIT_FEATHER + 1]
    assert bool((ramp[1:] <= ramp[:-1]).all()) and 0.4 < ramp[2] < 0.6  # a blend, not a seam


def test_all_zero_mask_returns_the_input_without_running_the_network():
    from evcli.methods.deshadow.infer import remove_shadow

    rgb = torch.rand(3, 20, 30)
    assert torch.equal(remove_shadow(_remover(_Fails()), rgb, torch.zeros(1, 20, 30)), rgb)


def test_tiled_inference_equals_one_pass_for_a_pointwise_model():
    from evcli.methods.deshadow.infer import remove_shadow

    rgb, mask = torch.rand(3, 50, 70), torch.ones(1, 50, 70)
    whole = remove_shadow(_remover(_Brighten()), rgb, mask, tile=1024, keep_lit=False)
    tiled = remove_shadow(_remover(_Brighten()), rgb, mask, tile=24, keep_lit=False)  # 3 x 4 tiles
    assert torch.allclose(whole, tiled, atol=1e-6)


class _TileMean(nn.Module):
    """Not pointwise (each tile's mean enters its output), counting its calls."""

    calls = 0

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _TileMean.calls += 1
        return (0.5 * rgb + rgb.mean()).clamp(0, 1)


def test_keep_lit_skips_only_tiles_whose_output_is_discarded():
    from evcli.methods.deshadow.infer import keep_lit_weight, remove_shadow

    rgb, mask = torch.rand(3, 60, 80), torch.zeros(1, 60, 80)
    mask[:, 10:18, 30:38] = 1  # its keep-lit margin reaches rows 20-32: a tile row that holds no mask pixel
    _TileMean.calls = 0
    full = remove_shadow(_remover(_TileMean()), rgb, mask, tile=24, keep_lit=False)  # 3 x 4 tiles
    assert _TileMean.calls == 12
    _TileMean.calls = 0
    kept = remove_shadow(_remover(_TileMean()), rgb, mask, tile=24)
    assert _TileMean.calls < 12  # tiles far from the mask did not run
    w = keep_lit_weight(mask)
    assert torch.allclose(kept, w * full + (1 - w) * rgb, atol=1e-6)  # and nothing that is kept changed


@pytest.mark.parametrize("tile", [1024, 24])
def test_a_model_returning_its_input_leaves_the_input_untouched(tile: int):
    from evcli.methods.deshadow.baselines import Identity
    from evcli.methods.deshadow.infer import remove_shadow

    rgb, mask = torch.rand(3, 50, 70), torch.zeros(1, 50, 70)
    mask[:, 10:30, 20:40] = 1
    before = rgb.clone()
    for keep_lit in (True, False):
        out = remove_shadow(_remover(Identity()), rgb, mask, tile=tile, keep_lit=keep_lit)
        assert torch.allclose(out, before, atol=1e-6) and torch.equal(rgb, before)


def test_lsa_stride_keeps_the_training_downsampling_up_to_the_cap():
    from evcli.methods.deshadow.labnet import LocalSpatialAttention

    lsa = LocalSpatialAttention(8, size=256, stride=2)
    assert lsa.working_size(128, 128) == (64, 64)
    assert lsa.working_size(360, 480) == (180, 240)  # same factor 2 at inference, aspect kept
    assert lsa.working_size(480, 640) == (192, 256)  # capped at 256
    assert LocalSpatialAttention(8, size=64).working_size(360, 480) == (64, 64)  # papers: a fixed square


# --------------------------------------------------------------------------------------------------
# Shipped weights on a held-out photo


@pytest.mark.parametrize("method", ["labnet", "sadc"])
def test_shipped_weights_beat_identity_in_the_shadow_and_keep_the_lit_region(method: str):
    from evcli.methods.deshadow.infer import load_remover, remove_shadow
    from evcli.metrics.image import rgb_to_lab

    def mae(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> float:
        err = (rgb_to_lab(a[None].double()) - rgb_to_lab(b[None].double())).abs().sum(1)[0]
        return float(err[region[0] > 0.5].mean())

    shadow, free, mask = _held_out(seed=5)
    out = remove_shadow(load_remover(method), shadow, mask)
    assert mae(out, free, mask) < 0.8 * mae(shadow, free, mask)
    if method == "labnet":
        assert mae(out, free, 1 - mask) <= mae(shadow, free, 1 - mask) + 1.0
    else:  # SADC still recolours the lit ring keep-lit hands it (bench: up to +3.8, target +1 not met)
        from evcli.methods.deshadow.infer import KEEP_LIT_FEATHER, KEEP_LIT_MARGIN
        from evcli.methods.deshadow.layers import dilate

        far = dilate(mask[None], 2 * (KEEP_LIT_MARGIN + KEEP_LIT_FEATHER) + 1)[0] < 0.5
        assert bool(far.any()) and torch.equal(out[:, far[0]], shadow[:, far[0]])


# --------------------------------------------------------------------------------------------------
# The command line


def _save(path: Path, rgb: torch.Tensor) -> Path:
    Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def test_default_mask_is_the_detector_and_the_compare_picture_is_labelled(tmp_path: Path):
    shadow, _, _ = _held_out()
    img = _save(tmp_path / "photo.png", shadow)
    r = run_cli(["deshadow", str(img), "--json"])
    assert r.code == 0, r.stderr
    out = json.loads(r.stdout)["images"][0]
    assert "estimated (detector)" in out["mask_source"] and Path(out["mask"]).exists()
    cmp = np.asarray(Image.open(out["compare"]).convert("RGB"))
    assert cmp.shape[0] >= 256 + 20  # enlarged to a readable height, with a label band above
    band = cmp[:16, :, :]
    assert (band < 100).any() and (band > 200).any()  # dark label text on a white band
    r2 = run_cli(["deshadow", str(img), "--mask-method", "otsu", "-o", str(tmp_path / "o.png"), "--json"])
    assert r2.code == 0 and "estimated (otsu)" in json.loads(r2.stdout)["images"][0]["mask_source"]
    r3 = run_cli(["deshadow", str(img), "--mask-method", "magic", "-o", str(tmp_path / "p.png")])
    assert r3.code == 2 and "--mask-method" in r3.stderr and "Traceback" not in r3.stderr


def test_shadow_free_photo_is_left_almost_unchanged(tmp_path: Path):
    _, free, _ = _held_out(size=(192, 144))  # the shipped detector's working size
    img = _save(tmp_path / "free.png", free)
    r = run_cli(["deshadow", str(img), "--json"])
    assert r.code == 0, r.stderr
    entry = json.loads(r.stdout)["images"][0]
    assert entry["shadow_fraction"] < 0.05
    from evcli.metrics.image import rgb_to_lab

    before = torch.from_numpy(np.asarray(Image.open(img), dtype=np.float64) / 255).permute(2, 0, 1)[None]
    after = torch.from_numpy(np.asarray(Image.open(entry["output"]), dtype=np.float64) / 255).permute(2, 0, 1)[None]
    assert (rgb_to_lab(after) - rgb_to_lab(before)).abs().sum(1).mean() <= 2.0  # issue 14's target, LAB-MAE


@pytest.mark.parametrize("fill, warning", [(0, "is empty"), (255, "covers the whole image")])
def test_all_zero_and_all_one_masks_warn_in_one_line(tmp_path: Path, fill: int, warning: str):
    shadow, _, _ = _held_out((40, 32))
    img = _save(tmp_path / "p.png", shadow)
    mask = tmp_path / "m.png"
    Image.fromarray(np.full((32, 40), fill, np.uint8)).save(mask)
    r = run_cli(["deshadow", str(img), "--mask", str(mask), "--method", "colour-transfer", "--json"])
    assert r.code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if warning in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    if fill == 0:
        out = json.loads(r.stdout)["images"][0]["output"]
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(img)))


def test_a_1x1_image_and_a_large_estimated_mask(tmp_path: Path):
    img = tmp_path / "dot.png"
    Image.fromarray(np.full((1, 1, 3), 40, np.uint8)).save(img)
    r = run_cli(["deshadow", str(img), "--json"])
    assert r.code == 0, r.stderr
    assert Image.open(json.loads(r.stdout)["images"][0]["output"]).size == (1, 1)
    ones = tmp_path / "ones.png"
    Image.fromarray(np.full((1, 1), 255, np.uint8)).save(ones)
    for method in ("labnet", "sadc"):  # the networks themselves on 1x1 (padded to their smallest size)
        out = tmp_path / f"dot_{method}.png"
        r = run_cli(["deshadow", str(img), "--mask", str(ones), "--method", method, "-o", str(out)])
        assert r.code == 0, r.stderr
        assert Image.open(out).size == (1, 1)
    dark = tmp_path / "dark.png"  # the Otsu estimator flags the darker half of a half-dark photo
    arr = np.full((32, 40, 3), 200, np.uint8)
    arr[:, :24] = 40
    Image.fromarray(arr).save(dark)
    r = run_cli(["deshadow", str(dark), "--mask-method", "otsu", "--method", "identity"])
    assert r.code == 0 and sum("over 40%" in ln for ln in r.stderr.splitlines()) == 1


def test_exif_orientation_is_applied(tmp_path: Path):
    from evcli.methods.deshadow.infer import read_image

    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=100)
    t = read_image(path)
    assert tuple(t.shape) == (3, 16, 8)
    assert t[:, :4].mean() > 0.8 and t[:, -4:].mean() < 0.2  # the white half is now on top


def test_detector_trains_through_the_engine_and_loads_from_its_run(tmp_path: Path):
    from evcli.methods.deshadow.infer import load_detector

    run = tmp_path / "det"
    sets = ["--set", "schedule.max_steps=2", "--set", "deshadow.builtin_train_samples=4"]
    sets += [
        "--set",
        "deshadow.builtin_val_samples=2",
        "--set",
        "deshadow.builtin_val_size=32",
        "--set",
        "deshadow.channels=8",
    ]
    r = run_cli(
        ["deshadow", "train", "--recipe", "deshadow/tiny", "--method", "detector", "-o", str(run), "--json", *sets]
    )
    assert r.code == 0, r.stderr
    metrics = json.loads(r.stdout)["metrics"]
    assert 0.0 <= metrics["ber"] <= 100.0 and 0.0 <= metrics["iou"] <= 1.0
    net = load_detector(run)
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)
    # photos reach it at the scale it trained at: working size = its training crop size (tiny: 32 px) ...
    from evcli.methods.deshadow.detector import detect_shadow

    assert net.work_size == 32 and detect_shadow(net, torch.rand(3, 48, 64)).prob.shape == (1, 24, 32)
    assert detect_shadow(net, torch.rand(3, 48, 64), work_size=64).prob.shape == (1, 48, 64)
    # ... or the recipe's deshadow.detector_work_size
    r = run_cli(
        ["deshadow", "train", "--recipe", "deshadow/tiny", "--method", "detector", "-o", str(tmp_path / "d2"), *sets]
        + ["--set", "deshadow.detector_work_size=16"]
    )
    assert r.code == 0, r.stderr
    assert load_detector(tmp_path / "d2").work_size == 16
    img = _save(tmp_path / "x.png", torch.rand(3, 16, 16))
    bad = run_cli(["deshadow", str(img), "--weights", str(run), "-o", str(tmp_path / "y.png")])
    assert bad.code == 2 and "shadow-detector weights" in bad.stderr and "Traceback" not in bad.stderr
