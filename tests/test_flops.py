"""The MAC counter of evcli.ops.flops: hand-made operators, DeiT-S against the card's 4.6 GFLOPs and against torch's
FlopCounterMode (which misses fused attention on CPU), and the per-layer rows sparsify's report reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evcli.ops.flops import COUNTER, count_macs, counting


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, contended CPU: one thread is many times faster than two
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def deit_small():
    import timm

    return timm.create_model("deit_small_patch16_224", num_classes=1000).eval()


def test_hand_made_operators_are_counted_exactly():
    lin = nn.Linear(8, 4)
    conv = nn.Conv2d(3, 6, 3, padding=1, groups=3)
    with counting() as c:
        lin(torch.zeros(2, 5, 8))  # 2*5 rows x 8 in x 4 out
    assert c.total == 2 * 5 * 8 * 4
    with counting() as c:
        conv(torch.zeros(1, 3, 7, 7))  # 6*7*7 outputs x (3/3 in) x 3x3
    assert c.total == 6 * 7 * 7 * 1 * 9
    q, k, v = torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 7, 4), torch.zeros(2, 3, 7, 6)
    with counting() as c:
        F.scaled_dot_product_attention(q, k, v)  # QK^T: 2*3*5*7*4, AV: 2*3*5*7*6
    assert c.total == 2 * 3 * 5 * 7 * (4 + 6)
    assert sum(c.by_kind().values()) == c.total  # fused kernel or plain bmm, whichever backend runs
    with counting() as c:
        torch.zeros(4, 5, 6) @ torch.zeros(4, 6, 2)
        torch.softmax(torch.zeros(10, 10), -1)  # not a multiply-accumulate: not counted
    assert c.total == 4 * 5 * 6 * 2


def test_deit_small_matches_the_card_and_torch_without_fused_attention(deit_small):
    """DeiT-S at 224 px, batch 1: 4.6 GFLOPs (= GMACs) in the card and DeiT; this counter within 1%, and exactly
    torch's FlopCounterMode / 2 when attention runs as plain matmuls (which FlopCounterMode can see)."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = count_macs(deit_small, (3, 224, 224))
    fused = sum(r.macs for r in rows)
    assert fused == pytest.approx(4.6e9, rel=0.01)
    # the card's formula: 12 blocks x (12 N d^2 + 2 N^2 d) + patch embedding + head, N = 197, d = 384
    n, d = 197, 384
    assert fused == 12 * (12 * n * d * d + 2 * n * n * d) + 196 * 768 * d + d * 1000
    attention = [r for r in rows if r.op == "attention"]
    assert len(attention) == 12 and attention[0].name == "blocks.0.attn"
    for blk in deit_small.blocks:
        blk.attn.fused_attn = False
    try:
        with FlopCounterMode(display=False) as torch_counter:
            deit_small(torch.zeros(1, 3, 224, 224))
        plain = sum(r.macs for r in count_macs(deit_small, (3, 224, 224)))
    finally:
        for blk in deit_small.blocks:
            blk.attn.fused_attn = True
    assert plain == fused == torch_counter.get_total_flops() // 2


def test_rows_keep_the_sparsify_api():
    """count_macs rows: one per Conv2d / Linear with its weight density (sparsify's report), COUNTER names it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with torch.no_grad():
        model[2].weight[:, ::2] = 0.0
    rows = {r.name: r for r in count_macs(model, (3, 8, 8))}
    assert rows["0"].macs == 4 * 6 * 6 * 3 * 9 and rows["0"].density == 1.0
    assert rows["2"].macs == 144 * 10 and rows["2"].density == pytest.approx(0.5)
    assert rows["2"].sparse_macs == pytest.approx(720)
    assert "attention" in COUNTER
