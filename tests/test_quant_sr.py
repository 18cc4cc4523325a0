"""`evcli quant-sr` model and algorithm: DDTB's quantizer formulas, gate structure and placement, calibration
statistics, attention transfer, schedule tables, parameter counts, Y PSNR/SSIM, and the integer export."""

from __future__ import annotations

import math

import pytest
import torch

from evcli.durations import resolve_duration
from evcli.methods.quant_sr.method import at_loss, attention_map, model_size
from evcli.methods.quant_sr.models import QuantSpec, SRNet, count_parameters
from evcli.methods.quant_sr.quantizers import (
    DDTBActQuant,
    DynamicGate,
    PAMSActQuant,
    QuantConv2d,
    asym_dequantize,
    asym_quantize,
    bound_init_percentiles,
    dynamic_intensity,
    sym_quantize,
    top_dynamic,
)
from evcli.metrics.sr import psnr_y, rgb_to_y, ssim_y
from evcli.recipe import resolve_recipe


def test_asymmetric_quantizer_formula_on_hand_made_values():
    x = torch.tensor([-1.0, 0.0, 0.3, 0.5, 2.0])
    # k=2, l=-0.5, u=1: s = 3/1.5 = 2, z = round(-1) = -1, q = round(2 x_c + 1) -> [0, 1, 2, 2, 3]
    out = asym_quantize(x, torch.tensor(-0.5), torch.tensor(1.0), 2)
    assert torch.allclose(out, torch.tensor([-0.5, 0.0, 0.5, 0.5, 1.0]))
    many = asym_quantize(torch.linspace(-3, 3, 1001), torch.tensor(-0.7), torch.tensor(1.3), 3)
    assert many.unique().numel() == 8  # exactly 2^k levels


def test_gradients_reach_both_bounds_through_clamp_and_scale():
    lower = torch.tensor(-0.5, requires_grad=True)
    upper = torch.tensor(1.0, requires_grad=True)
    x = torch.tensor([-2.0, -0.2, 0.1, 0.7, 3.0])
    asym_quantize(x, lower, upper, 2).sum().backward()
    assert upper.grad is not None and lower.grad is not None
    assert float(upper.grad) != 0.0 and float(lower.grad) != 0.0


def test_pams_symmetric_quantizer_levels():
    out = sym_quantize(torch.linspace(-3, 3, 101), torch.tensor(2.0), 2)
    assert sorted(out.unique().tolist()) == [-2.0, 0.0, 2.0]  # 2^(k-1) - 1 = 1 positive level
    out3 = sym_quantize(torch.linspace(-3, 3, 1001), torch.tensor(1.5), 3)
    assert out3.unique().numel() == 7


def test_gate_structure_parameter_count_and_range():
    gate = DynamicGate(64)
    assert sum(p.numel() for p in gate.parameters()) == 64 * 32 + 2 * 32 + 32 * 2 == 2176
    assert gate.fc1.bias is None and gate.fc2.bias is None and gate.fc2.out_channels == 2
    q = DDTBActQuant(2, 64)
    q.is_dynamic.fill_(True)
    q.gate_on.fill_(True)
    x = torch.randn(4, 64, 6, 6)
    q(x)
    beta = 2 * torch.sigmoid(q.last_logits)
    assert q.last_logits.shape == (4, 2) and bool(((beta > 0) & (beta < 2)).all())
    # the gate's 1x1 convs hold ternary (2-bit symmetric) weights
    w = gate.fc1.weight
    assert sym_quantize(w, w.abs().max(), 2).unique().numel() <= 3


@pytest.mark.parametrize("mode, first_layer_learns", [("ste", True), ("release", False)])
def test_gate_gradient_modes(mode: str, first_layer_learns: bool):
    gate = DynamicGate(8, ste=mode == "ste")
    gate.train()
    gate(torch.randn(4, 8, 5, 5)).pow(2).sum().backward()
    assert gate.fc2.weight.grad is not None and float(gate.fc2.weight.grad.abs().sum()) > 0
    got = gate.fc1.weight.grad is not None and float(gate.fc1.weight.grad.abs().sum()) > 0
    assert got == first_layer_learns


def test_dynamic_gate_rescales_bounds_per_image_only_after_warmup():
    q = DDTBActQuant(2, 4)
    q.upper.data.fill_(1.0)
    q.lower.data.fill_(-1.0)
    q.is_dynamic.fill_(True)
    x = torch.randn(3, 4, 5, 5) * 3
    static = asym_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), 2)
    assert torch.equal(q(x), static)  # warm-up: static bounds, logits computed
    assert q.last_logits is not None
    q.gate_on.fill_(True)
    with torch.no_grad():
        q.gate.fc2.weight.fill_(0.0)  # logits 0 -> beta 1: the same as static
    assert torch.allclose(q(x), static)


def test_dynamic_intensity_and_top_fraction():
    assert dynamic_intensity([(1.0, 0.0), (3.0, -2.0)]) == pytest.approx(2.0)  # var(1,3) + var(0,-2)
    intens = [float(i % 7) + i / 100 for i in range(48)]
    chosen = top_dynamic(intens, 0.3)
    assert len(chosen) == 14  # int(48 * 0.3) for EDSR
    assert min(intens[i] for i in chosen) >= max(intens[i] for i in range(48) if i not in chosen)
    assert len(top_dynamic(intens[:16], 0.1)) == 1  # SRResNet-style ratio


def test_bound_initialisation_percentiles():
    upper, lower = bound_init_percentiles(torch.arange(101.0), 99.0)
    assert (upper, lower) == (pytest.approx(99.0), pytest.approx(1.0))


def test_edsr_quantizer_placement_counts():
    net = SRNet("edsr_baseline", 4, q=QuantSpec(2, "ddtb"))
    assert len(net.act_quantizers()) == 48 and len(net.quant_convs()) == 32
    for part in (net.head, net.body_tail, net.tail, *net.upsample):
        assert not isinstance(part, QuantConv2d)
    pams = SRNet("edsr_baseline", 4, blocks=2, channels=8, q=QuantSpec(3, "pams"))
    assert all(isinstance(q, PAMSActQuant) for _, q in pams.act_quantizers())
    assert {c.mode for _, c in pams.quant_convs()} == {"sym"}


@pytest.mark.parametrize(
    "arch, scale, params",
    [
        ("edsr_baseline", 4, 1_517_571),  # EDSR-baseline x4, commonly quoted 1.5M
        ("edsr_baseline", 2, 1_369_859),
        ("edsr", 4, 43_089_923),  # EDSR x4, the paper's 43M
        ("srresnet", 4, 1_547_350),  # SRResNet x4, 1.5M (BN + PReLU)
    ],
)
def test_parameter_counts_at_paper_size(arch: str, scale: int, params: int):
    with torch.device("meta"):
        net = SRNet(arch, scale)
    assert count_parameters(net) == params


def test_quantized_edsr_keeps_fp_keys_and_fp_weights_load():
    fp = SRNet("edsr_baseline", 4, blocks=2, channels=8)
    q = SRNet("edsr_baseline", 4, blocks=2, channels=8, q=QuantSpec(2, "ddtb"))
    missing = set(q.state_dict()) - set(fp.state_dict())
    assert set(fp.state_dict()) <= set(q.state_dict())
    assert all(".quant_act" in k or k.endswith(("w_low", "w_high", "weight_is_codes")) for k in missing)


def test_weight_quantizer_clips_at_percentiles_and_codes_round_trip():
    conv = QuantConv2d(8, 8, 3, padding=1, bits=2, mode="asym99")
    w = conv.quantized_weight().detach()
    lo, hi = conv.weight_range()
    half_step = float(hi - lo) / 3 / 2  # the grid sits on integer multiples of 1/s: within half a step of [lo, hi]
    assert w.unique().numel() <= 4
    assert float(w.min()) >= float(lo) - half_step - 1e-6 and float(w.max()) <= float(hi) + half_step + 1e-6
    assert float(lo) == pytest.approx(float(torch.quantile(conv.weight.detach().flatten(), 0.01)))
    codes, low, high = conv.codes()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 3
    assert torch.allclose(asym_dequantize(codes.float(), low, high, 2), w.detach(), atol=1e-6)
    x = torch.randn(1, 8, 6, 6)
    ref = conv(x)
    conv.weight.data.copy_(codes.float())
    conv.w_low.copy_(low)
    conv.w_high.copy_(high)
    conv.weight_is_codes.fill_(True)
    assert torch.allclose(conv(x), ref, atol=1e-5)


def test_attention_transfer_loss_formula():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    manual_s = s.pow(2).mean(1).flatten(1)
    manual_s = manual_s / manual_s.norm(dim=1, keepdim=True)
    assert torch.allclose(attention_map(s), manual_s, atol=1e-6)
    manual_t = t.pow(2).mean(1).flatten(1)
    manual_t = manual_t / manual_t.norm(dim=1, keepdim=True)
    assert float(at_loss(s, t)) == pytest.approx(float((manual_s - manual_t).pow(2).mean()), rel=1e-5)
    assert float(at_loss(s, s)) == 0.0


def test_schedule_table_of_the_default_recipe():
    r = resolve_recipe("quant-sr")
    assert r.schedule.epochs == 59 and r.schedule.sched == "step" and r.schedule.gamma == 0.5
    assert r.optim.name == "adam" and r.optim.lr == 1e-4 and r.method.bound_lr == 1e-2
    per_epoch = 1000
    total = 59 * per_epoch
    # the paper: lr halves at epochs 10, 20, ... counting the calibration epoch = after 9, 19, ... training epochs
    got = [resolve_duration(m, per_epoch, total) for m in r.schedule.milestones]
    assert got == [9000, 19000, 29000, 39000, 49000]
    assert resolve_duration(r.method.gate_warmup, per_epoch, total) == 4000  # epochs 2-5 of 60
    assert r.method.resolved_ratio() == 0.3 and r.method.w_at == 1000.0 and r.method.bound_percentile == 99.0
    assert r.method.bound_init == "all_bits" and r.method.gate_grad == "ste"


def test_y_psnr_ssim_with_border_shave():
    hr = torch.full((1, 3, 16, 16), 128 / 255)
    sr = hr + 10 / 255
    y_diff = 10 * (65.481 + 128.553 + 24.966) / 255 / 255
    assert float(psnr_y(sr, hr, 4)) == pytest.approx(-10 * math.log10(y_diff**2), abs=1e-6)
    assert float((rgb_to_y(torch.ones(1, 3, 1, 1)) * 255).squeeze()) == pytest.approx(235.0)
    edge = hr.clone()
    edge[..., :4, :] = 0.0  # differs only inside the shaved border
    assert float(psnr_y(edge, hr, 4)) == pytest.approx(100.0)
    assert float(ssim_y(hr, hr, 4)) == pytest.approx(1.0)


def test_model_size_counts_packed_bits():
    fp = SRNet("edsr_baseline", 4, blocks=2, channels=8)
    q = SRNet("edsr_baseline", 4, blocks=2, channels=8, q=QuantSpec(2, "ddtb"))
    size = model_size(q, 2)
    assert size["fp32_size_bytes"] == 4 * count_parameters(fp)
    body_w = 4 * 8 * 8 * 9  # four 3x3 8->8 quantized convs
    assert size["fp32_size_bytes"] - size["size_bytes"] == 4 * body_w - body_w * 2 // 8 - 4 * 8 - 6 * 8


def test_shipped_recipes_load_with_the_cards_settings():
    from evcli.cli.common import shipped_recipes

    names = [n for n in shipped_recipes() if n.startswith("quant-sr/")]
    assert {"quant-sr/tiny", "quant-sr/tiny_fp", "quant-sr/edsr_x4_fp"} <= set(names)
    for bits in (2, 3, 4):
        r = resolve_recipe("quant-sr", recipe_file=shipped_recipes()[f"quant-sr/edsr_x4_ddtb_{bits}bit"])
        assert r.method.bits == bits and r.method.method == "ddtb" and r.method.scale == 4
        assert r.data.img_size == 192 and r.data.batch_size == 16 and r.schedule.epochs == 59
        assert [resolve_duration(m, 1000, 59000) for m in r.schedule.milestones] == [9000, 19000, 29000, 39000, 49000]
        assert resolve_duration(r.method.gate_warmup, 1000, 59000) == 4000
        assert r.method.calib_batches == 1000 and r.method.resolved_ratio() == 0.3 and r.method.bound_lr == 1e-2
    pams = resolve_recipe("quant-sr", recipe_file=shipped_recipes()["quant-sr/edsr_x4_pams_2bit"])
    assert pams.method.method == "pams" and pams.method.bits == 2
    srres = resolve_recipe("quant-sr", recipe_file=shipped_recipes()["quant-sr/srresnet_x4_ddtb_2bit"])
    assert srres.method.arch == "srresnet" and srres.method.resolved_ratio() == 0.1
    for name in names:
        resolve_recipe("quant-sr", recipe_file=shipped_recipes()[name])


def test_pams_weight_codes_round_trip():
    conv = QuantConv2d(4, 4, 3, padding=1, bits=3, mode="sym")
    x = torch.randn(1, 4, 5, 5)
    ref = conv(x).detach()
    codes, low, high = conv.codes()
    assert int(codes.max()) <= 6 and float(low) == -float(high)  # 2 * (2^(k-1) - 1) + 1 symmetric levels
    conv.weight.data.copy_(codes.float())
    conv.w_low.copy_(low)
    conv.w_high.copy_(high)
    conv.weight_is_codes.fill_(True)
    assert torch.allclose(conv(x), ref, atol=1e-5)


def test_codes_stay_within_two_to_the_k_levels_at_a_rounding_tie():
    # l = 0.25, u = 1.75, k = 2: s = 2, s l = 0.5 -> z = 0 (half to even), s u - z = 3.5 -> round = 4 = 2^k:
    # the clamp keeps q at 3, so x = u maps to 1.5, not to a fifth level at 2.0
    out = asym_quantize(torch.tensor([0.25, 1.75]), torch.tensor(0.25), torch.tensor(1.75), 2)
    assert out.tolist() == [0.0, 1.5]
