"""`evcli deshadow` pieces: LAB-Net and SADC architecture fidelity, losses and schedules, LAB metrics,
the built-in rendered shadows and the ISTD/SRD readers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evcli.data.shadow import BuiltinShadowDataset, istd_triples, render_shadow, srd_triples
from evcli.errors import DataError
from evcli.methods.deshadow.baselines import ColourTransfer, estimate_shadow_mask
from evcli.methods.deshadow.labnet import LAPLACIAN, EnhancedChannelAttention, LABNet, LocalSpatialAttention
from evcli.methods.deshadow.layers import (
    ConvLayer,
    conv1x1_sum,
    dilate,
    fused_available,
    fused_bf16_available,
    init_kaiming,
    plain_forward,
)
from evcli.methods.deshadow.losses import PERCEPTUAL_DIVISORS, distillation_kl, gradient_loss
from evcli.methods.deshadow.sadc import DynConv, SADCNet, _region_mean, kd_coefficient
from evcli.metrics.image import lab8_to_rgb, psnr, rgb_to_lab, rgb_to_lab8, ssim
from evcli.metrics.shadow import ShadowMetrics

CARD_LABNET_PARAMS = 933_000  # card: "(computed) 0.933 M parameters" (channels=32)


def _params(m: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------
# LAB-Net


@pytest.mark.parametrize("laplacian", ["fixed", "trainable"])
def test_labnet_parameter_count_at_paper_size(laplacian: str):
    n = _params(LABNet(channels=32, laplacian=laplacian))
    assert abs(n - CARD_LABNET_PARAMS) / CARD_LABNET_PARAMS < 0.02, n
    # the release's trainable Laplacian adds exactly one 3x3 depthwise kernel per ECA (3C channels, 8 Basic Blocks)
    if laplacian == "trainable":
        assert n - _params(LABNet(channels=32, laplacian="fixed")) == 8 * 96 * 9


@pytest.mark.slow
def test_labnet_macs_at_256_match_card():
    from evcli.methods.deshadow.cost import count_macs

    x, m = torch.rand(1, 3, 256, 256), torch.zeros(1, 1, 256, 256)
    m[..., 64:128, 64:128] = 1
    macs = count_macs(LABNet(32).eval(), x, m)
    assert abs(macs - 59.6e9) / 59.6e9 < 0.05, macs


def test_eca_fixed_laplacian_is_constant_and_trainable_is_a_parameter():
    fixed = EnhancedChannelAttention(24, "fixed")
    assert "kernel" not in dict(fixed.named_parameters())
    assert torch.equal(fixed.kernel[5, 0], LAPLACIAN)
    trainable = EnhancedChannelAttention(24, "trainable")
    assert trainable.kernel.requires_grad and trainable.kernel.shape == (24, 1, 3, 3)
    # a constant image has zero Laplacian response, so every channel gets the same (bias-only) gate
    torch.nn.init.zeros_(fixed.fc1.bias)
    torch.nn.init.zeros_(fixed.fc2.bias)
    out = fixed(torch.full((1, 24, 6, 6), 2.0))
    assert torch.allclose(out, torch.full_like(out, 1.0))  # 2 * sigmoid(0)


def test_eca_uses_standard_deviation_of_laplacian():
    eca = EnhancedChannelAttention(8, "fixed")
    x = torch.rand(2, 8, 9, 9)
    lap = torch.nn.functional.conv2d(x, LAPLACIAN.expand(8, 1, 3, 3), groups=8)
    stat = lap.flatten(2).std(2)
    expected = x * torch.sigmoid(eca.fc2(torch.nn.functional.leaky_relu(eca.fc1(stat), 0.2)))[..., None, None]
    assert torch.allclose(eca(x), expected, atol=1e-6)


def test_lsa_shadow_pixels_attend_only_to_the_ring():
    torch.manual_seed(0)
    lsa = LocalSpatialAttention(8, size=16).eval()
    x = torch.rand(1, 8, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:9, 6:9] = 1
    from evcli.methods.deshadow.layers import dilate

    ring = dilate(mask, 3) - mask  # pixels 5..9
    base = lsa(x, mask, ring)
    far = x.clone()
    far[..., 0:2, 0:2] += 5.0  # far from the ring (beyond the 3x3 receptive field of k)
    assert torch.allclose(lsa(far, mask, ring)[..., 6:9, 6:9], base[..., 6:9, 6:9], atol=1e-6)
    near = x.clone()
    near[..., 5, 5] += 5.0  # a ring pixel
    assert not torch.allclose(lsa(near, mask, ring)[..., 6:9, 6:9], base[..., 6:9, 6:9], atol=1e-4)
    # an empty ring zeroes the attended shadow features (the release's behaviour), output still finite
    assert torch.isfinite(lsa(x, mask, torch.zeros_like(ring))).all()


def test_labnet_runs_at_any_size_and_keeps_shape():
    net = LABNet(channels=8, lsa_size=16).eval()
    for h, w in ((9, 14),):
        m = torch.zeros(1, 1, h, w)
        m[..., : h // 2, : w // 2] = 1
        assert net(torch.rand(1, 3, h, w), m).shape == (1, 3, h, w)


# --------------------------------------------------------------------------------------------------
# SADC


@pytest.fixture(scope="module")
def random_vgg() -> torch.nn.Sequential:
    from evcli.methods.deshadow.layers import vgg16_features

    return vgg16_features("random", None)[0]


def test_sadc_parameter_counts_match_card(random_vgg: torch.nn.Sequential):
    net = SADCNet(channels=64)
    trainable = _params(net, trainable_only=True)
    assert abs(trainable - 1.31e6) / 1.31e6 < 0.02, trainable  # card: ~1.31 M effective trainable
    total = _params(net) + _params(random_vgg)  # the frozen VGG16 is a separate module of the run
    assert abs(total - (16.71e6 - 0.68e6)) / 16.03e6 < 0.02  # card total minus its dead modules


@pytest.mark.parametrize("kernel,dilation", [(1, 1), (3, 1), (3, 4), (3, 16)])
def test_dynconv_sparse_inference_equals_dense(kernel: int, dilation: int):
    torch.manual_seed(0)
    layer = DynConv(8, kernel, dilation).eval()
    h, w = 100, 134  # not whole tiles
    x = torch.randn(2, 8, h, w)
    m = torch.zeros(2, 1, h, w)
    m[0, :, 3:9, 5:12] = 1  # at the top border: reflection of conv_a's output is read
    m[0, :, 90:100, 120:134] = 1  # bottom-right corner, in the partial tiles
    m[1, :, 40:45, 60:70] = 1
    layer.sparse = False
    dense = layer(x, m, m, m)
    layer.sparse = True
    sparse = layer(x, m, m, m)
    assert layer.last_heavy_fraction < DynConv.SPARSE_BELOW  # the tiled path ran, not the dense fallback
    assert torch.allclose(dense, sparse, atol=1e-5)
    # non-shadow pixels take the light path only: x + act(depthwise(x))
    light = x + layer.light(x)
    assert torch.allclose(sparse[:, :, 20, 30], light[:, :, 20, 30], atol=1e-6)
    # no shadow: no heavy work at all; a shadow over most of the image: the dense path
    assert torch.allclose(layer(x, torch.zeros_like(m), m, m), light) and layer.last_heavy_fraction == 0.0
    full = torch.ones_like(m)
    full[..., :2, :2] = 0
    layer.sparse = False
    dense = layer(x, full, full, full)
    layer.sparse = True
    assert torch.allclose(layer(x, full, full, full), dense, atol=1e-5) and layer.last_heavy_fraction == 1.0


def test_sadc_network_sparse_equals_dense(random_vgg: torch.nn.Sequential):
    torch.manual_seed(0)
    net = SADCNet(channels=16).eval()
    x, m = torch.rand(1, 3, 72, 100), torch.zeros(1, 1, 72, 100)
    m[..., 10:22, 8:20] = 1
    for layer in net.dyn:
        layer.sparse = False
    dense = net(x, m, random_vgg)
    for layer in net.dyn:
        layer.sparse = True
    assert torch.allclose(dense, net(x, m, random_vgg), atol=1e-4)
    assert min(layer.last_heavy_fraction for layer in net.dyn) < DynConv.SPARSE_BELOW


def test_kd_coefficient_cosine_ramp():
    assert kd_coefficient(0, 50, 300) == 0.0 and kd_coefficient(49, 50, 300) == 0.0
    assert kd_coefficient(50, 50, 300) == 0.0
    assert kd_coefficient(175, 50, 300) == pytest.approx(1 - math.cos(math.pi / 4))
    assert kd_coefficient(300, 50, 300) == pytest.approx(1.0)
    values = [kd_coefficient(e, 50, 300) for e in range(300)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_distillation_kl_teacher_is_detached_light_statistic():
    heavy = torch.randn(3, 16, requires_grad=True)
    light = torch.randn(3, 16, requires_grad=True)
    loss = distillation_kl([(heavy, light)])
    expected = (torch.softmax(light, 1) * (torch.log_softmax(light, 1) - torch.log_softmax(heavy, 1))).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert heavy.grad is not None and light.grad is None
    assert distillation_kl([(light.detach(), light.detach())]).item() == pytest.approx(0.0, abs=1e-6)


def test_region_mean_falls_back_to_global_for_tiny_or_full_masks():
    feat = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).view(2, 3, 20, 20)
    m = torch.zeros(2, 1, 20, 20)
    m[0, :, :5, :5] = 1  # 25 px <= 100: global
    m[1, :, :12, :12] = 1  # 144 px: regional
    region = m.clone()
    out = _region_mean(feat, region, m)
    assert torch.allclose(out[0], feat[0].mean((1, 2)))
    assert torch.allclose(out[1], feat[1, :, :12, :12].mean((1, 2)))


def test_linear_decay_schedule():
    from evcli.engine.optim import LRSchedule
    from evcli.recipe import resolve_recipe

    cfg = resolve_recipe("deshadow", sets=["schedule.sched=linear", "schedule.decay_start=50step"]).schedule
    s = LRSchedule(cfg, base_lr=1.0, total_steps=300, steps_per_epoch=1)
    assert [s.factor(i) for i in (0, 49, 50)] == [1.0, 1.0, 1.0]
    assert s.factor(175) == pytest.approx(0.5)
    assert s.factor(300) == 0.0


# --------------------------------------------------------------------------------------------------
# Losses, colour, metrics


def test_gradient_loss_and_perceptual_divisors():
    x = torch.rand(2, 3, 8, 8)
    assert gradient_loss(x, x).item() == 0.0
    # a constant offset shows only against the zero padding (as in the papers' code): on each side, 6 rows
    # with |response| 4c and 2 corners with 3c, two sides per direction, two directions, over 64 pixels
    assert gradient_loss(x, x + 0.3).item() == pytest.approx(0.3 * 2 * 2 * (6 * 4 + 2 * 3) / 64, abs=1e-5)
    assert gradient_loss(x, x.flip(-1)).item() > 0
    assert PERCEPTUAL_DIVISORS == (1.0, 2.6, 4.8, 3.7, 5.6, 0.15)


def test_lab_matches_scikit_image_and_round_trips():
    from skimage.color import rgb2lab

    rgb = torch.rand(3, 7, 9, dtype=torch.float64)
    ours = rgb_to_lab(rgb).permute(1, 2, 0).numpy()
    ref = rgb2lab(rgb.permute(1, 2, 0).numpy())
    assert np.abs(ours - ref).max() < 0.05
    assert torch.allclose(lab8_to_rgb(rgb_to_lab8(rgb)), rgb, atol=1e-5)
    lab8 = rgb_to_lab8(torch.ones(3, 1, 1))  # white: L = 100 -> 255/255, a = b = 0 -> 128/255
    assert torch.allclose(lab8.flatten(), torch.tensor([1.0, 128 / 255, 128 / 255], dtype=lab8.dtype), atol=2e-3)


def test_shadow_metrics_are_per_pixel_over_the_dataset():
    gt = torch.full((2, 3, 16, 16), 0.5)
    pred = gt.clone()
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :4, :4] = 1  # 16 shadow pixels
    mask[1, :, :8, :8] = 1  # 64 shadow pixels
    pred[0, :, :4, :4] = 0.3  # error only in the shadow of image 0
    acc = ShadowMetrics("full")
    acc.update(pred, gt, mask)
    s = acc.summary()
    per_px = (rgb_to_lab(torch.full((3, 1, 1), 0.3)) - rgb_to_lab(torch.full((3, 1, 1), 0.5))).abs().sum().item()
    assert s["lab_mae_ns"] == 0.0
    assert s["lab_mae_s"] == pytest.approx(per_px * 16 / 80, rel=1e-6)  # 16 wrong of 80 shadow pixels
    assert s["lab_mae_all"] == pytest.approx(per_px * 16 / 512, rel=1e-6)
    assert s["images"] == 2
    resized = ShadowMetrics("256x256")
    resized.update(pred, gt, mask)
    assert resized.summary()["lab_mae_ns"] < 0.5 and resized.summary()["lab_mae_s"] > 0


def test_psnr_ssim_basics():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert psnr(x, x + 0.1).tolist() == pytest.approx([20.0, 20.0], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Data


def test_render_shadow_darkens_inside_the_mask_and_is_seeded():
    free = np.full((64, 64, 3), 0.6, dtype=np.float32)
    shadow, mask = render_shadow(free, np.random.default_rng(3))
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
    inside, outside = shadow[mask > 0].mean(0), shadow[(mask == 0)].mean(0)
    assert (inside < 0.7 * outside).all()
    assert inside[2] / inside[0] > outside[2] / outside[0]  # shadows are bluer than lit surfaces
    again, _ = render_shadow(free, np.random.default_rng(3))
    assert np.array_equal(shadow, again)


def test_builtin_dataset_is_deterministic_per_epoch_and_index():
    ds = BuiltinShadowDataset(("astronaut",), length=4, size=24, seed=0, train=True)
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(1, 1)]
    assert a["shadow"].shape == (3, 24, 24) and a["mask"].shape == (1, 24, 24)
    assert torch.equal(a["shadow"], b["shadow"]) and not torch.equal(a["shadow"], c["shadow"])


def _png(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def test_istd_and_srd_layout_readers(tmp_path: Path):
    istd = tmp_path / "ISTD"
    for split in ("train", "test"):
        for name in ("a", "b"):
            _png(istd / f"{split}_A" / f"{name}.png", 60)
            _png(istd / f"{split}_B" / f"{name}.png", 255, mode="L")
            _png(istd / f"{split}_C" / f"{name}.png", 120)
    triples = istd_triples(istd, "train")
    assert [t[0].name for t in triples] == ["a.png", "b.png"]
    (istd / "test_C" / "b.png").unlink()
    with pytest.raises(DataError, match="no shadow-free image for b.png"):
        istd_triples(istd, "test")

    srd = tmp_path / "SRD"
    _png(srd / "train" / "shadow" / "IMG_1.jpg", 60)
    _png(srd / "train" / "shadow_free" / "IMG_1_no_shadow.jpg", 120)
    with pytest.raises(DataError, match="no mask folder"):
        srd_triples(srd, "train", None)
    _png(tmp_path / "masks" / "train" / "IMG_1.png", 255, mode="L")
    (t,) = srd_triples(srd, "train", tmp_path / "masks")
    assert t[2].name == "IMG_1_no_shadow.jpg" and t[1].parent.name == "train"


def test_colour_transfer_and_mask_estimator():
    rgb = torch.full((3, 32, 32), 0.7)
    rgb[:, 8:20, 8:20] *= 0.4
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:20, 8:20] = 1
    out = ColourTransfer()(rgb[None], mask[None])[0]
    assert torch.allclose(out[:, 12, 12], torch.full((3,), 0.7), atol=0.02)  # shadow brought to its ring
    assert torch.equal(out[:, 0, 0], rgb[:, 0, 0]) or torch.allclose(out[:, 0, 0], rgb[:, 0, 0], atol=1e-6)
    est = estimate_shadow_mask(rgb)
    assert est.shape == (1, 32, 32) and est[0, 14, 14] == 1 and est[0, 0, 0] == 0


def test_identity_init_makes_labnet_start_as_the_identity():
    from evcli.methods.deshadow.layers import init_kaiming
    from evcli.methods.deshadow.method import identity_init_labnet

    net = LABNet(channels=8, lsa_size=16).eval()
    init_kaiming(net)
    identity_init_labnet(net)
    lab = torch.rand(1, 3, 20, 20)
    m = torch.zeros(1, 1, 20, 20)
    m[..., 5:10, 5:10] = 1
    assert torch.allclose(net(lab, m), lab, atol=1e-6)


def _lively_labnet(laplacian: str = "fixed") -> LABNet:
    """A C=8 LAB-Net whose features stay O(0.1) through all blocks (Kaiming init, random biases): with
    PyTorch's default init they fade to ~0 and the output would hide differences in the blocks."""
    torch.manual_seed(0)
    net = LABNet(8, laplacian, lsa_size=16).eval()
    init_kaiming(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
    return net


needs_fused = pytest.mark.skipif(not fused_available(), reason="this torch has no oneDNN fused convolution ops")


@needs_fused
@pytest.mark.parametrize(
    ("kernel", "dilation", "groups"), [(1, 1, 1), (3, 1, 1), (3, 2, 1), (3, 8, 1), (3, 16, 1), (5, 2, 1), (3, 4, 6)]
)
@pytest.mark.parametrize("size", [(40, 52), (9, 30), (33, 33)])
def test_fused_conv_layer_equals_its_forward(kernel: int, dilation: int, groups: int, size: tuple[int, int]):
    torch.manual_seed(0)
    layer = ConvLayer(6, 12, kernel, dilation, groups=groups).eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 6, *size).contiguous(memory_format=fmt)
        with torch.no_grad():
            # border bands recomputed with reflection (small dilations on maps >= 4x the padding), one padded
            # copy otherwise, replicate padding where the map is too small to reflect
            assert torch.allclose(layer.fused(x), layer(x), atol=1e-5)


@needs_fused
def test_conv1x1_sum_equals_the_conv_of_the_concatenation():
    torch.manual_seed(0)
    layer = ConvLayer(4 + 8 + 12, 10, 1).eval()
    parts = [torch.randn(1, c, 7, 9).contiguous(memory_format=torch.channels_last) for c in (4, 8, 12)]
    with torch.no_grad():
        assert torch.allclose(conv1x1_sum(parts, layer.conv), layer(torch.cat(parts, dim=1)), atol=1e-5)
        assert torch.allclose(conv1x1_sum(parts, layer.conv, act=False), layer.conv(torch.cat(parts, dim=1)), atol=1e-5)
        with pytest.raises(ValueError, match="channels"):
            conv1x1_sum(parts[:2], layer.conv)


@needs_fused
@pytest.mark.parametrize("laplacian", ["fixed", "trainable"])
@pytest.mark.parametrize("shadow", ["box", "none", "all"])
def test_labnet_fused_inference_equals_the_plain_forward(monkeypatch: pytest.MonkeyPatch, laplacian: str, shadow: str):
    """The fused CPU path (one image, no autograd) against the module-by-module forward and the autograd
    path, on a map large enough for reflection at dilation 64; LSA with a ring, without shadow, all shadow."""
    from evcli.methods.deshadow.cost import count_macs
    from evcli.methods.deshadow.labnet import BasicBlock

    net = _lively_labnet(laplacian)
    h, w = 136, 140
    x, m = torch.rand(1, 3, h, w), torch.zeros(1, 1, h, w)
    if shadow == "box":
        m[..., 30:90, 40:100] = 1
    elif shadow == "all":
        m[:] = 1
    calls = []
    original = BasicBlock._fused
    monkeypatch.setattr(BasicBlock, "_fused", lambda self, t: calls.append(1) or original(self, t))
    with torch.no_grad():
        fused = net(x, m)
        assert len(calls) == 8, "the fused path did not run"
        with plain_forward():
            plain = net(x, m)
        assert len(calls) == 8, "plain_forward did not switch the fused path off"
        net_cl = net.to(memory_format=torch.channels_last)
        fused_cl = net_cl(x.contiguous(memory_format=torch.channels_last), m)
        macs_one = count_macs(net, x, m)
    grad_path = net(x, m)  # autograd on: the plain path, unfolded
    assert plain.std() > 0.1
    for out in (fused, fused_cl, grad_path):
        assert torch.allclose(out, plain, atol=1e-5), float((out - plain).abs().max())
    # the count (plain forward, folded ECA for one image) equals the count of a batch of two per image
    assert macs_one == count_macs(net, torch.rand(2, 3, h, w), m.expand(2, -1, -1, -1)) // 2


@needs_fused
@pytest.mark.parametrize("shadow", ["box", "none", "all"])
def test_lsa_fused_equals_plain(shadow: str):
    """LSA's fused path fuses the attended part at the working size and upsamples after the 1x1 conv."""
    torch.manual_seed(0)
    lsa = LocalSpatialAttention(8, size=16).eval()
    x, m = torch.randn(1, 8, 37, 45), torch.zeros(1, 1, 37, 45)
    if shadow == "box":
        m[..., 10:25, 12:30] = 1
    elif shadow == "all":
        m[:] = 1
    ring = dilate(m, 11) - m
    with torch.no_grad():
        fused = lsa(x.contiguous(memory_format=torch.channels_last), m, ring)
        with plain_forward():
            plain = lsa(x, m, ring)
    assert plain.std() > 0.1 and torch.allclose(fused, plain, atol=1e-5)


@pytest.mark.skipif(not fused_bf16_available(), reason="oneDNN's fused bf16 convolution needs AVX-512 on this CPU")
def test_labnet_fused_bf16_is_close_to_plain_bf16():
    net = _lively_labnet().to(torch.bfloat16, memory_format=torch.channels_last)
    x, m = torch.rand(1, 3, 136, 140).to(torch.bfloat16), torch.zeros(1, 1, 136, 140, dtype=torch.bfloat16)
    m[..., 30:90, 40:100] = 1
    with torch.no_grad():
        fused = net(x.contiguous(memory_format=torch.channels_last), m).float()
        with plain_forward():
            plain = net(x.contiguous(memory_format=torch.channels_last), m).float()
    assert fused.dtype == plain.dtype and (fused - plain).abs().max() < 0.05 * plain.abs().max()


def test_retain_freed_memory_toggles_glibc_malloc(monkeypatch: pytest.MonkeyPatch):
    import platform
    import sys

    from evcli.runtime import retain_freed_memory, retain_freed_memory_unless_opted_out

    monkeypatch.setenv("EVCLI_MALLOC", "default")
    assert retain_freed_memory_unless_opted_out() is False  # the user kept glibc's defaults

    applied = retain_freed_memory()
    try:
        # applies with glibc on Linux (CI and the dev machines); a no-op returning False elsewhere
        assert applied is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
        assert torch.ones(3 << 20).sum() == 3 << 20  # large blocks still allocate (from the heap)
    finally:
        assert retain_freed_memory(False) == applied
