"""`evcli sparsify` invariants on hand-made tensors: N:M layout and masks, LBC's combination table, init, score
gradient, removal schedule and re-zeroing, OptG's sigmoid schedule, global threshold and supermask gradient,
SR-STE's refined decay, packing sizes, layer targeting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from evcli.methods.sparsify.layers import (
    LBCSite,
    OptGSite,
    SRSTESite,
    attach,
    detach,
    global_threshold_masks,
    select_layers,
)
from evcli.methods.sparsify.schedules import (
    cubic_sparsity,
    lbc_remaining,
    optg_mask_lr_factor,
    optg_sparsity,
)
from evcli.ops.nm import (
    combination_table,
    expected_packed_ratio,
    from_groups,
    is_nm,
    nm_mask,
    nm_violations,
    pack_nm,
    packed_nbytes,
    parse_nm,
    to_groups,
    unpack_nm,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = [(2, 4, 6), (1, 4, 4), (4, 8, 70), (2, 8, 28), (1, 16, 16)]


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 4:8 ", (4, 8)), ("1:16", (1, 16))])
def test_parse_nm_accepts(text: str, expected: tuple[int, int]):
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text", ["5:4", "4:4", "2:0", "0:4", "a:b", "2-4", "2:4:8", "1:32", ""])
def test_parse_nm_rejects(text: str):
    with pytest.raises(ValueError):
        parse_nm(text)


def test_conv_groups_run_along_input_channels():
    # w[o, i, h, k] = i: after the [O, kh, kw, I] permute, each group is 4 consecutive input channels
    w = torch.arange(8.0).view(1, 8, 1, 1).expand(2, 8, 3, 3).contiguous()
    g = to_groups(w, 4)
    assert g.shape == (2 * 3 * 3 * 2, 4)
    assert torch.equal(g[0], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.equal(g[1], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    x = torch.randn(6, 8, 3, 3)
    assert torch.equal(from_groups(to_groups(x, 4), x.shape), x)
    lin = torch.randn(5, 12)
    assert torch.equal(to_groups(lin, 4)[1], lin[0, 4:8])
    with pytest.raises(ValueError, match="not divisible"):
        to_groups(torch.randn(4, 6, 3, 3), 4)


@pytest.mark.parametrize("n,m,combos", PATTERNS)
def test_combination_table_has_every_subset_once(n: int, m: int, combos: int):
    table = combination_table(n, m)
    assert table.shape == (combos, m) == (math.comb(m, n), m)
    assert torch.all(table.sum(1) == n)
    assert len({tuple(r.tolist()) for r in table}) == combos
    # each position lies in C(M-1, N-1) subsets
    assert torch.all(table.sum(0) == math.comb(m - 1, n - 1))


@pytest.mark.parametrize("n,m,combos", PATTERNS)
def test_lbc_scores_start_so_every_weight_sums_to_one(n: int, m: int, combos: int):
    site = LBCSite(torch.Size([4, 16, 3, 3]), n, m)
    assert site.alpha.shape == (4 * 16 * 9 // m, combos)
    assert torch.allclose(site.alpha, torch.full_like(site.alpha, 1.0 / math.comb(m - 1, n - 1)))
    assert torch.allclose(site.scores_per_weight(), torch.ones(4 * 16 * 9 // m, m))


@pytest.mark.parametrize("n,m,combos", PATTERNS)
def test_nm_mask_keeps_exactly_n_per_group(n: int, m: int, combos: int):
    w = torch.randn(8, 32, 3, 3)
    mask = nm_mask(w, n, m)
    assert torch.all(to_groups(mask, m).sum(1) == n)
    assert is_nm(w * mask, n, m) and not is_nm(w, n, m)
    # the kept ones are the largest |w| of the group
    g, gm = to_groups(w.abs(), m), to_groups(mask, m)
    assert torch.all(g[gm.bool()].view(-1, n).min(1).values >= g[~gm.bool()].view(-1, m - n).max(1).values)


# The card's removal table (t_i=0, t_f=60, p=3) and the DeiT-S row (t_f=200, p=4).
REMOVAL_TABLE = {
    (2, 4): [6, 5, 4, 3, 2, 2, 2, 2, 1],
    (1, 4): [4, 4, 3, 2, 2, 2, 2, 2, 1],
    (4, 8): [70, 55, 41, 22, 10, 4, 2, 2, 1],
    (2, 8): [28, 22, 17, 10, 5, 3, 2, 2, 1],
    (1, 16): [16, 13, 10, 6, 3, 2, 2, 2, 1],
}


@pytest.mark.parametrize("nm", list(REMOVAL_TABLE))
def test_lbc_removal_schedule_matches_card_table(nm: tuple[int, int]):
    combos = math.comb(nm[1], nm[0])
    got = [lbc_remaining(e, combos, 0, 60, 3) for e in (0, 5, 10, 20, 30, 40, 50, 59, 60)]
    assert got == REMOVAL_TABLE[nm]
    series = [lbc_remaining(e, combos, 0, 60, 3) for e in range(121)]
    assert all(a >= b for a, b in zip(series, series[1:])) and series[-1] == 1


def test_lbc_removal_schedule_deit():
    got = {e: lbc_remaining(e, 6, 0, 200, 4) for e in (0, 20, 50, 80, 199, 200)}
    assert got == {0: 6, 20: 5, 50: 3, 80: 2, 199: 2, 200: 1}
    assert lbc_remaining(3, 6, 5, 10, 3) == 6  # before t_i nothing is removed


def test_optg_sigmoid_schedule_values():
    assert optg_sparsity(50, 100, 0.9, 1.0) == pytest.approx(0.45)
    assert optg_sparsity(0, 100, 0.9, 1.0) == pytest.approx(0.9 / (1 + math.exp(50)))
    assert optg_sparsity(99, 100, 0.9, 1.0) == pytest.approx(0.9 / (1 + math.exp(-49)))
    # the card's pitfall: beta 0.5, E=30 ends visibly below target
    assert optg_sparsity(29, 30, 0.9, 0.5) == pytest.approx(0.9 / (1 + math.exp(-7)), abs=1e-12)
    assert optg_sparsity(29, 30, 0.9, 0.5) == pytest.approx(0.899180, abs=1e-6)
    assert optg_mask_lr_factor(15, 30, 1.0) == 0.5
    assert optg_mask_lr_factor(10, 30, 1.0) == pytest.approx(1 / (1 + math.exp(5)))
    vals = [optg_sparsity(e, 30, 0.9, 1.0) for e in range(30)]
    assert all(a < b for a, b in zip(vals, vals[1:]))


def test_cubic_sparsity_ramp():
    assert cubic_sparsity(0, 0.9, 0, 10) == 0.0
    assert cubic_sparsity(5, 0.9, 0, 10) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(10, 0.9, 0, 10) == 0.9


def test_lbc_score_gradient_is_taylor_saliency_of_members():
    """∂L/∂α_c = 1[α_c≠0] Σ_j Π_cj W_j ∂L/∂Ŵ_j ; ∂L/∂W = m ⊙ ∂L/∂Ŵ."""
    site = LBCSite(torch.Size([1, 4]), 2, 4)  # one group, combos (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    with torch.no_grad():
        site.alpha.copy_(torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0, 0.25]]))  # only {0,1} and {2,3} alive
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    upstream = torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    w_hat = site.masked_weight(w)
    assert torch.equal(w_hat.detach(), w.detach())  # every weight in an alive combination
    (w_hat * upstream).sum().backward()
    wg = (w * upstream).detach()[0]  # W_j ∂L/∂Ŵ_j = [0.1, -0.4, 0.9, -1.6]
    expected = torch.tensor([[wg[0] + wg[1], 0.0, 0.0, 0.0, 0.0, wg[2] + wg[3]]])
    assert torch.allclose(site.alpha.grad, expected)
    assert torch.allclose(w.grad, upstream)

    # one combination left: exact 2:4 and no gradient to the dropped weights
    with torch.no_grad():
        site.alpha.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.7]]))
    site.alpha.grad = None
    w.grad = None
    w_hat = site.masked_weight(w)
    assert torch.equal(w_hat.detach(), torch.tensor([[0.0, 0.0, 3.0, 4.0]]))
    (w_hat * upstream).sum().backward()
    assert torch.allclose(w.grad, torch.tensor([[0.0, 0.0, 0.3, -0.4]]))
    assert torch.allclose(site.alpha.grad, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.9 - 1.6]]))


def test_lbc_negative_scores_keep_weights():
    site = LBCSite(torch.Size([1, 4]), 2, 4)
    with torch.no_grad():
        site.alpha.copy_(torch.tensor([[-0.3, 0.0, 0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(site.masked_weight(torch.ones(1, 4)).detach(), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_lbc_remove_rezeroes_smallest_and_zeros_first():
    site = LBCSite(torch.Size([2, 4]), 2, 4)
    with torch.no_grad():
        site.alpha.copy_(
            torch.tensor(
                [
                    [0.9, -0.5, 0.3, 0.0, 0.2, 0.8],  # a zero (already removed) and a negative
                    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                ]
            )
        )
    site.remove(2)
    assert torch.equal(site.alpha.detach() == 0, torch.tensor([[0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]]).bool())
    # momentum revives a zeroed score: the next removal at the same k zeroes it again
    with torch.no_grad():
        site.alpha[1, 0] = 0.05
    site.remove(2)
    assert int((site.alpha[1] == 0).sum()) == 2 and site.alpha[1, 0] == 0
    site.remove(5)  # k = C-1: exactly one combination, exact 2:4
    w = torch.randn(2, 4)
    assert torch.all(to_groups(site.masked_weight(w).detach() != 0, 4).sum(1) == 2)
    assert torch.equal(site.final_mask(w), site.mask().view(2, 4))


def test_optg_supermask_gradient():
    """∂L/∂S = W ⊙ ∂L/∂Ŵ for kept and pruned weights; ∂L/∂W = m ⊙ ∂L/∂Ŵ."""
    site = OptGSite(torch.Size([1, 4]))
    site.mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    upstream = torch.tensor([[0.5, 0.5, -1.0, 2.0]])
    w_hat = site.masked_weight(w)
    assert torch.equal(w_hat.detach(), torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
    (w_hat * upstream).sum().backward()
    assert torch.allclose(site.scores.grad, torch.tensor([[0.5, 1.0, -3.0, 8.0]]))
    assert torch.allclose(w.grad, torch.tensor([[0.5, 0.0, -1.0, 0.0]]))


def test_global_threshold_sets_layer_ratios():
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    b = torch.tensor([0.9, 0.8, 0.05, 0.7, 0.6, 0.5])
    ma, mb = global_threshold_masks([a, b], 0.4)  # keep the 6 largest of 10: tau = 0.4
    assert ma.tolist() == [0, 0, 0, 1] and mb.tolist() == [1, 1, 0, 1, 1, 1]
    # ties (all zero scores at the start): strict < tau prunes nothing, the undershoot the card warns of
    za, zb = global_threshold_masks([torch.zeros(4), torch.zeros(6)], 0.3)
    assert za.sum() + zb.sum() == 10
    # the target masks (end of training, export): exactly round(p * total), ties broken by the smaller |W|
    wa, wb = torch.tensor([0.5, 0.1, 0.9, 0.2]), torch.tensor([0.3, 0.8, 0.05, 0.7, 0.6, 0.4])
    za, zb = global_threshold_masks([torch.zeros(4), torch.zeros(6)], 0.3, tiebreak=[wa, wb])
    assert za.tolist() == [1, 0, 1, 0] and zb.tolist() == [1, 1, 0, 1, 1, 1]
    sa, sb = global_threshold_masks([torch.tensor([-1.0, 0, 0, 0]), torch.zeros(6)], 0.2, tiebreak=[wa, wb])
    assert sa.tolist() == [0, 1, 1, 1] and zb.sum() == 5 and sb.tolist() == [1, 1, 0, 1, 1, 1]


def test_srste_backward_adds_refined_decay():
    site = SRSTESite(torch.Size([1, 4]), 2, 4, decay=0.1)
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0]], requires_grad=True)
    out = site.masked_weight(w)
    assert torch.equal(out.detach(), torch.tensor([[0.0, -3.0, 0.0, 2.0]]))
    out.sum().backward()
    assert torch.allclose(w.grad, torch.tensor([[1.0 + 0.1 * 1.0, 1.0, 1.0 + 0.1 * 0.5, 1.0]]))


def test_pack_roundtrip_and_size():
    w = torch.randn(8, 16)
    w = (w * nm_mask(w, 2, 4)).half()
    packed = pack_nm(w, 2, 4)
    assert packed["values"].shape == (32, 2)
    assert packed["indices"].numel() == 16  # 64 kept values x 2 bits = 16 bytes
    assert packed_nbytes(packed) == 128 + 16
    assert packed_nbytes(packed) / (w.numel() * 2) == pytest.approx(0.5625)
    assert torch.equal(unpack_nm(packed, torch.float16), w)
    conv = torch.randn(6, 16, 3, 3)
    conv = conv * nm_mask(conv, 1, 16)
    assert torch.equal(unpack_nm(pack_nm(conv, 1, 16), torch.float32), conv.half().float())
    assert expected_packed_ratio(2, 4) == pytest.approx(0.5625) and expected_packed_ratio(1, 16) == pytest.approx(
        (16 + 4) / (16 * 16)
    )
    with pytest.raises(ValueError, match="not 2:4"):
        pack_nm(torch.ones(4, 8), 2, 4)
    assert nm_violations(torch.ones(4, 8), 2, 4) == 8


def test_layer_targeting_resnet_and_vit():
    import timm

    cnn = timm.create_model("test_resnet", num_classes=10)
    choice = select_layers(cnn, [], [], 4)
    names = [n for n, _ in choice.selected]
    assert "conv1.0" not in names and "fc" not in names and "layer1.0.conv1" in names
    assert dict(choice.skipped)["conv1.0"].startswith("stem") and dict(choice.skipped)["fc"].startswith("classifier")
    sel = [n for n, _ in select_layers(cnn, [r"re:layer[1-4]\..*conv"], ["layer4"], 4).selected]
    assert sel == ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1"] + [
        "layer3.0.conv2",
        "layer3.0.conv3",
    ]
    assert [n for n, _ in select_layers(cnn, ["type:Linear"], [], 4).selected] == ["fc"]
    # 3:7 fits no layer: all listed with the reason
    none = select_layers(cnn, [], [], 7)
    assert not none.selected and any("not divisible by M=7" in r for _, r in none.skipped)
    from evcli.errors import UsageError

    with pytest.raises(UsageError, match="matches no"):
        select_layers(cnn, ["re:nothing_here"], [], 4)

    vit = timm.create_model("test_vit", num_classes=10, img_size=16, patch_size=4)
    vsel = select_layers(vit, [], [], 4)
    assert {type(m) for _, m in vsel.selected} == {nn.Linear} and len(vsel.selected) == 24
    assert "patch_embed.proj" in dict(vsel.skipped) and "head" in dict(vsel.skipped)


def test_depthwise_convs_are_listed_dense():
    import timm

    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    choice = select_layers(model, [], [], 4)
    skipped = dict(choice.skipped)
    depthwise = [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    assert depthwise and all("not divisible" in skipped[n] for n in depthwise)
    assert choice.selected


def test_attach_keeps_state_dict_keys_and_detach_restores():
    conv = nn.Conv2d(8, 4, 3)
    keys = set(conv.state_dict())
    site = LBCSite(conv.weight.shape, 2, 4)
    with torch.no_grad():
        site.alpha.zero_()
        site.alpha[:, 0] = 1.0  # combination {0, 1} of every group
    attach(conv, site)
    # the layer keeps its keys; the site's scores join as a submodule (dropped from exports)
    assert set(conv.state_dict()) == keys | {"evcli_site.alpha"} and isinstance(conv, nn.Conv2d)
    x = torch.randn(1, 8, 5, 5)
    expected = nn.functional.conv2d(x, conv.weight * from_groups(site.mask(), conv.weight.shape), conv.bias)
    assert torch.allclose(conv(x), expected)
    import copy

    twin = copy.deepcopy(conv)
    assert twin.evcli_site is site  # an EMA copy shares the scores
    detach(conv)
    assert set(conv.state_dict()) == keys
    assert type(conv) is nn.Conv2d and torch.allclose(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias))


def test_resnet50_size_and_macs_match_the_papers_dense_model():
    """ResNet-50 as the cards count it: 25.6M parameters, about 4.1 GMACs at 224 px (conv + linear, batch 1)."""
    import timm

    from evcli.ops.flops import count_macs

    model = timm.create_model("resnet50", num_classes=1000)
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(25.557e6, rel=0.02)
    rows = count_macs(model, (3, 224, 224))
    assert sum(r.macs for r in rows) == pytest.approx(4.1e9, rel=0.05)
    # LBC's default targeting: the 52 convs after the stem, the stem conv and fc dense
    choice = select_layers(model, [], [], 4)
    assert len(choice.selected) == 52 and {"conv1", "fc"} <= set(dict(choice.skipped))
