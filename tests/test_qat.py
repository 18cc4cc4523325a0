"""evcli qat, the formulas: LSQ levels, gradients and init; the LTS threshold schedules, distance EMA, level-flip
reset, warm-up and permanent freezing; frozen weights that never move under SGD with momentum and weight decay;
the real weight-gradient skip of frozen channels and layers; 2/4-bit packing; the counted backward FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from evcli.methods.qat.export import pack_levels, unpack_levels
from evcli.methods.qat.lts import backward_flops_saved, lts_rho, lts_update, restore_frozen, zero_frozen_grad
from evcli.methods.qat.quant import (
    LsqQuantizer,
    LtsState,
    QuantConv2d,
    QuantLinear,
    level_range,
    lsq_init_step,
)


def test_level_ranges_of_every_bit_width():
    assert level_range(2, True) == (-2, 1)
    assert level_range(3, True) == (-4, 3)
    assert level_range(4, True) == (-8, 7)
    assert level_range(8, True) == (-128, 127)
    assert level_range(2, False) == (0, 3)
    assert level_range(4, False) == (0, 15)
    for bad in (0, 1, 9):
        with pytest.raises(ValueError):
            level_range(bad, True)


def test_lsq_forward_levels_and_straight_through_gradients():
    q = LsqQuantizer(2, signed=True, weight=True)  # levels -2..1
    with torch.no_grad():
        q.step.fill_(0.5)
    x = torch.tensor([-2.0, -0.6, 0.2, 0.3, 0.9, 5.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == pytest.approx([-1.0, -0.5, 0.0, 0.5, 0.5, 0.5])
    y.sum().backward()
    # x: identity inside [Qn·s, Qp·s] = [-1, 0.5], zero outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # s: LSQ's gradient (round(v) - v inside, Qn / Qp clipped), scaled by g = 1 / sqrt(N·Qp)
    v = [-4.0, -1.2, 0.4, 0.6, 1.8, 10.0]
    per = [-2.0, round(v[1]) - v[1], round(v[2]) - v[2], round(v[3]) - v[3], 1.0, 1.0]
    g = 1.0 / math.sqrt(6 * 1)
    assert float(q.step.grad) == pytest.approx(sum(per) * g, rel=1e-5)


def test_lsq_init_per_tensor_and_per_channel():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    assert float(lsq_init_step(w, 7)) == pytest.approx(2 * 1.25 / math.sqrt(7))
    per = lsq_init_step(w, 1, channel_dim=0)
    assert per.tolist() == pytest.approx([2 * 2.0, 2 * 0.5])
    q = LsqQuantizer(4, True, channels=2, weight=True)
    q.init_from(w)
    assert q.step.tolist() == pytest.approx([4 / math.sqrt(7), 1 / math.sqrt(7)])
    assert q.levels(w).abs().max() <= 8


def test_unsigned_activation_levels():
    q = LsqQuantizer(2, signed=False)  # 0..3
    with torch.no_grad():
        q.step.fill_(1.0)
    assert q(torch.tensor([[-1.0, 0.4, 2.6, 9.0]])).tolist() == [[0.0, 0.0, 3.0, 3.0]]


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", [0.0, 0.0, 0.25, 0.25, 0.25, 0.25]),
        ("linear", [0.0, 0.0, 0.0, 1 / 3, 2 / 3, 1.0]),
        ("sine", [0.0, 0.0, 0.0, math.sin(math.pi / 6), math.sin(math.pi / 3), 1.0]),
    ],
)
def test_lts_threshold_schedules(schedule: str, expected: list[float]):
    got = [lts_rho(t, warmup=2, total=5, schedule=schedule, rate=0.25) for t in range(6)]
    assert got == pytest.approx(expected)


def _state(w: torch.Tensor) -> LtsState:
    return LtsState(w)


def test_lts_ema_starts_from_the_first_distance_and_resets_on_a_level_flip():
    s = _state(torch.zeros(3))
    one = torch.tensor(1.0)
    w = torch.tensor([0.1, 0.4, 1.45])  # levels 0, 0, 1; distances .1 .4 .45
    lts_update(w, one, -2, 1, s, step=0, gamma=0.9, rho=None)
    assert s.distance.tolist() == pytest.approx([0.1, 0.4, 0.45])  # not (1-γ)·d from a zero buffer
    w2 = torch.tensor([0.2, 0.6, 1.3])  # second weight flips 0 -> 1; distances .2 .4 .3
    lts_update(w2, one, -2, 1, s, step=1, gamma=0.9, rho=None)
    assert s.distance.tolist() == pytest.approx([0.1 * 0.2 + 0.9 * 0.1, 1.0, 0.1 * 0.3 + 0.9 * 0.45])
    assert s.prev_level.tolist() == [0, 1, 1]
    assert not s.frozen.any()  # rho None: warm-up, nothing freezes


def test_lts_freezes_below_the_threshold_permanently_and_never_pruned_weights():
    s = _state(torch.zeros(4))
    one = torch.tensor(1.0)
    w = torch.tensor([0.05, 0.3, 0.02, -0.925])
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0])
    n = lts_update(w, one, -2, 1, s, step=7, gamma=0.0, rho=0.1, keep=keep)
    assert n == 2  # 0.05 and -0.925 (d <= .1); 0.3 is far; 0.02 is pruned
    assert s.frozen_step.tolist() == [8, 0, 0, 8]
    assert s.frozen_value.tolist() == pytest.approx([0.05, 0.0, 0.0, -0.925])
    # later, even far from its level, a frozen weight stays frozen with its step and value
    lts_update(torch.tensor([0.5, 0.5, 0.5, 0.5]), one, -2, 1, s, step=8, gamma=0.0, rho=0.1, keep=keep)
    assert s.frozen_step.tolist() == [8, 0, 0, 8]
    assert s.frozen_value.tolist() == pytest.approx([0.05, 0.0, 0.0, -0.925])


def test_frozen_weights_never_move_under_sgd_momentum_and_weight_decay():
    torch.manual_seed(0)
    layer = QuantConv2d.from_conv(
        nn.Conv2d(4, 6, 3, padding=1), weight_bits=4, act_bits=4, per_channel=False, learn_weight_step=False
    )
    layer.lts = LtsState(layer.weight)
    frozen = torch.rand_like(layer.weight) < 0.5
    layer.lts.frozen_step[frozen] = 1
    layer.lts.frozen_value.copy_(layer.weight.detach())
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD([layer.weight, layer.bias], lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        layer(torch.randn(2, 4, 5, 5)).square().mean().backward()
        zero_frozen_grad(layer.weight, layer.lts)
        assert (layer.weight.grad[frozen] == 0).all()
        opt.step()
        opt.zero_grad()
        restore_frozen(layer.weight.data, layer.lts)
    assert torch.equal(layer.weight[frozen], before[frozen])
    assert not torch.equal(layer.weight[~frozen], before[~frozen])


def _dense_and_skipped(layer_cls, make, x_shape, frozen_rows):
    torch.manual_seed(1)
    base = make()
    quant = dict(weight_bits=4, act_bits=None, per_channel=True, learn_weight_step=False)
    a = layer_cls(base, **quant)
    b = layer_cls(make(), **quant)
    b.load_state_dict(a.state_dict())
    b.lts = LtsState(b.weight)
    b.lts.frozen_step[frozen_rows] = 1
    b.lts.refresh_channels()
    b.skip_frozen_grad = True
    x = torch.randn(*x_shape)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ga = torch.randn_like(a(xa))
    a(xa).backward(ga)
    yb = b(xb)
    yb.backward(ga)
    return a, b, xa, xb


@pytest.mark.parametrize(
    "layer_cls,make,shape",
    [
        (QuantConv2d.from_conv, lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 6)),
        (QuantLinear.from_linear, lambda: nn.Linear(7, 5), (4, 7)),
    ],
)
def test_weight_gradient_skip_of_frozen_channels_is_exact(layer_cls, make, shape):
    rows = [0, 3]
    a, b, xa, xb = _dense_and_skipped(layer_cls, make, shape, rows)
    assert b.lts.active_channels.tolist() == [1, 2, 4]
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)  # the input gradient is unchanged
    active = [1, 2, 4]
    assert torch.allclose(a.weight.grad[active], b.weight.grad[active], atol=1e-6)
    assert (b.weight.grad[rows] == 0).all()
    assert torch.allclose(a.bias.grad, b.bias.grad, atol=1e-6)


def test_a_whole_frozen_layer_gets_no_weight_gradient():
    a, b, xa, xb = _dense_and_skipped(QuantConv2d.from_conv, lambda: nn.Conv2d(3, 4, 3), (2, 3, 5, 5), [0, 1, 2, 3])
    assert b.lts.active_channels.numel() == 0
    assert b.weight.grad is None  # never computed
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)


def test_depthwise_conv_is_quantized_and_trains():
    layer = QuantConv2d.from_conv(
        nn.Conv2d(4, 4, 3, groups=4, padding=1), weight_bits=3, act_bits=3, per_channel=True, learn_weight_step=True
    )
    y = layer(torch.randn(2, 4, 5, 5))
    y.sum().backward()
    assert y.shape == (2, 4, 5, 5) and layer.weight.grad is not None and layer.w_quant.step.grad.shape == (4,)
    assert layer.int_weight().abs().max() <= 4 and layer.int_weight().min() >= -4


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_round_trip_and_size(bits: int):
    qn, qp = level_range(bits, True)
    levels = torch.arange(qn, qp + 1, dtype=torch.int8).repeat(7)[:-1].reshape(-1)  # odd count: padding
    packed = pack_levels(levels, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(levels.numel() * bits / 8)
    assert torch.equal(unpack_levels(packed, bits, list(levels.shape)), levels)
    # the documented layout: first value in the lowest bits, stored as level - Qn
    assert int(packed[0]) & ((1 << bits) - 1) == int(levels[0]) - qn


def test_counted_backward_flops_saved():
    rows = [{"macs": 100, "frozen": 0.5}, {"macs": 300, "frozen": 1.0}]
    # backward = dX + dW = 2·MACs per layer; frozen weights save their share of dW
    assert backward_flops_saved(rows) == pytest.approx((50 + 300) / 800)
    assert backward_flops_saved([]) == 0.0


def test_lsq_init_of_a_sparse_weight_ignores_its_zeros():
    w = torch.tensor([[2.0, 0.0, -4.0, 0.0]])
    mask = (w != 0).float()
    assert float(lsq_init_step(w, 1, mask=mask)) == pytest.approx(2 * 3.0)
    assert lsq_init_step(w, 1, channel_dim=0, mask=mask).tolist() == pytest.approx([6.0])
    assert float(lsq_init_step(w, 1)) == pytest.approx(2 * 1.5)
