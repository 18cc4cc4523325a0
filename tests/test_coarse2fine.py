"""CF-ViT's model and method pinned to the card: token counts, child indices, global class attention, the fine
sequence (informative children + reuse, coarse input embeddings for the rest), early exit for c = 7 and c = 9
layouts, the loss, the selection schedule, the per-threshold sums, and DeiT-S FLOPs per stage."""

from __future__ import annotations

import math

import pytest
import torch

from evcli.methods.coarse2fine.model import (
    CFViT,
    block_with_class_attention,
    child_index,
    fine_tokens,
    num_informative,
    stage_macs,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(img: int, patch: int, classes: int = 5, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=img, patch_size=patch, num_classes=classes, **kw).eval()


def tiny_cfvit(c: int = 3, patch: int = 2, **kw) -> CFViT:
    return CFViT(tiny_vit(2 * c * patch, patch), c, **kw).eval()


def test_token_counts_and_child_indices_of_the_card():
    assert (num_informative(7, 0.5), num_informative(9, 0.5)) == (25, 41)
    assert (fine_tokens(7, 0.5), fine_tokens(9, 0.5)) == (125, 205)
    assert fine_tokens(7, 0.5, informative=False) == 197
    idx = child_index(7)
    assert idx.shape == (49, 4)
    assert idx[0].tolist() == [0, 1, 14, 15]  # coarse (0, 0)
    assert idx[8].tolist() == [30, 31, 44, 45]  # coarse (1, 1): 2*1*14 + 2*1
    nine = child_index(9)  # the 9x9 model's fine grid is 18x18 (288 px), not 14x14
    assert nine[80].tolist() == [304, 305, 322, 323]
    assert sorted(nine.reshape(-1).tolist()) == list(range(324))  # every fine patch once


def test_class_attention_block_equals_timm_block_and_its_softmax_row():
    vit = tiny_vit(12, 2)
    blk = vit.blocks[0]
    x = torch.randn(2, 37, vit.embed_dim)
    out, row = block_with_class_attention(blk, x)
    torch.testing.assert_close(out, blk(x), atol=1e-5, rtol=1e-5)
    a = blk.attn
    q, k, _ = a.qkv(blk.norm1(x)).reshape(2, 37, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    full = (q @ k.transpose(-2, -1) * a.scale).softmax(-1)  # B x heads x N x N
    torch.testing.assert_close(row, full[:, :, 0], atol=1e-6, rtol=1e-5)


def test_global_class_attention_is_the_beta_ema_over_blocks_from_three():
    model = tiny_cfvit(c=3, patch=2, beta=0.9)  # 6 blocks: blocks 3, 4, 5 enter
    xc = torch.randn(2, 3, 6, 6)
    rows = []
    original = block_with_class_attention

    import evcli.methods.coarse2fine.model as mod

    def spy(blk, x):
        out, row = original(blk, x)
        rows.append(row)
        return out, row

    mod.block_with_class_attention = spy
    try:
        _, _, cls_attn, _ = model.coarse(xc)
    finally:
        mod.block_with_class_attention = original
    assert len(rows) == 3
    g = torch.zeros_like(rows[0])
    for r in rows:
        g = 0.9 * g + 0.1 * r
    torch.testing.assert_close(cls_attn, g[:, :, 1:].mean(1))
    assert cls_attn.shape == (2, 9)


def test_fine_sequence_children_with_reuse_and_coarse_input_embeddings_for_the_rest():
    c, patch = 3, 2
    model = tiny_cfvit(c, patch)
    b, d = 2, model.embed_dim
    x = torch.randn(b, 3, 12, 12)
    _, final, _, embedded = model.coarse(model.coarse_input(x))
    cls_attn = torch.rand(b, c * c)
    seq = model.fine_sequence(x, final, cls_attn, embedded, informative=True)
    k = num_informative(c, 0.5)  # 5 of 9
    assert seq.shape == (b, 1 + 4 * k + c * c - k, d)
    # reference: every fine token = patch embedding + its parent's reuse feature + fine position
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    reuse = model.reuse(final[:, 1:])
    for i in range(b):
        top = cls_attn[i].argsort(descending=True)[:k]
        rest = cls_attn[i].argsort(descending=True)[k:]
        for slot, parent in enumerate(top.tolist()):
            pi, pj = divmod(parent, c)
            for n, child in enumerate(child_index(c)[parent].tolist()):
                ci, cj = divmod(child, 2 * c)
                assert (ci // 2, cj // 2) == (pi, pj)  # nearest upsampling: the parent's feature
                want = patches[i, child] + reuse[i, parent] + model.pos_embed[0, 1 + child]
                torch.testing.assert_close(seq[i, 1 + 4 * slot + n], want, atol=1e-5, rtol=1e-5)
        # the rest: coarse INPUT embeddings (E(x_c) + P_c), no reuse
        torch.testing.assert_close(seq[i, 1 + 4 * k :], embedded[i, 1 + rest], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seq[:, 0], (model.cls_token + model.pos_embed[:, :1]).expand(b, -1, -1)[:, 0])
    full = model.fine_sequence(x, final, cls_attn, embedded, informative=False)
    assert full.shape == (b, 1 + 4 * c * c, d)


def test_reuse_block_has_the_reference_vit_init():
    """The reference builds the reuse MLP inside the model before the ViT weight init: truncated normal std 0.02,
    zero biases (PyTorch's default init would give fc1 a std of about 1 / sqrt(3 d))."""
    from evcli.methods.coarse2fine.model import ReuseBlock

    torch.manual_seed(0)
    block = ReuseBlock(192)
    for fc in (block.fc1, block.fc2):
        assert abs(float(fc.weight.detach().std()) - 0.02) < 0.002
        assert torch.count_nonzero(fc.bias) == 0
    assert torch.equal(block.norm.weight, torch.ones(192)) and torch.count_nonzero(block.norm.bias) == 0


@pytest.mark.parametrize("c", [3, 9])
def test_early_exit_runs_the_fine_stage_on_the_rest_only(c: int):
    """Odd grids included (9 is the paper's 9x9 layout, here with 2 px patches at 36 px)."""
    model = tiny_cfvit(c, 2)
    x = torch.randn(6, 3, 4 * c, 4 * c)
    with torch.no_grad():
        lc, lf = model(x, mode="both")
        conf = lc.softmax(-1).amax(-1)
        eta = float(conf.median())
        seen = []
        original = model.fine
        model.fine = lambda xf, *a, **k: (seen.append(xf.shape[0]), original(xf, *a, **k))[1]
        out, go_on = model.early_exit(x, eta)
        del model.fine
    torch.testing.assert_close(go_on, conf < eta)
    assert seen == [int(go_on.sum())] and 0 < seen[0] < 6
    torch.testing.assert_close(out[go_on], lf[go_on], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~go_on], lc[~go_on])
    with torch.no_grad():
        torch.testing.assert_close(model.early_exit(x, 0.0)[0], lc)
        torch.testing.assert_close(model.early_exit(x, 1.0)[0], lf, atol=1e-5, rtol=1e-5)
        one = model(x[:1], threshold=1.0)  # batch of one (the released squeeze breaks it)
    torch.testing.assert_close(one, lf[:1], atol=1e-5, rtol=1e-5)


def test_deit_small_stage_flops_match_the_card():
    """Counter: evcli.ops.flops at batch 1. Card (derived): c=7 coarse 1.1, fine 2.9, eta=1 total 4.0 GFLOPs (dense
    4.6); c=9 coarse 1.8, total 6.8. DeiT-S: 22M parameters."""
    import timm

    vit = timm.create_model("deit_small_patch16_224", num_classes=1000)
    assert sum(p.numel() for p in vit.parameters()) == pytest.approx(22.05e6, rel=0.02)
    macs = stage_macs(CFViT(vit, 7).eval())
    assert macs["coarse"] == pytest.approx(1.1e9, rel=0.05)
    assert macs["fine"] == pytest.approx(2.9e9, rel=0.05)
    assert macs["total"] == pytest.approx(4.0e9, rel=0.05)
    # analytic: 12 blocks x (12 N d^2 + 2 N^2 d) + embeddings, N = 50 coarse / 125 fine, d = 384, + reuse MLP 49 x 8d^2
    d = 384
    block = lambda n: 12 * n * d * d + 2 * n * n * d  # noqa: E731
    class_rows = 9 * 50 * d  # q_cls k^T of the blocks that enter the global class attention
    assert macs["coarse"] == 12 * block(50) + 49 * 768 * d + d * 1000 + class_rows
    assert macs["fine"] == 12 * block(125) + 196 * 768 * d + 49 * 8 * d * d + d * 1000
    nine = stage_macs(CFViT(timm.create_model("deit_small_patch16_224", img_size=288), 9).eval())
    assert nine["coarse"] == pytest.approx(1.8e9, rel=0.05) and nine["total"] == pytest.approx(6.8e9, rel=0.05)


def test_loss_is_ce_on_fine_plus_kl_to_the_detached_fine():
    from evcli.methods.coarse2fine.method import cfvit_loss

    torch.manual_seed(0)
    lc = torch.randn(4, 5, requires_grad=True)
    lf = torch.randn(4, 5, requires_grad=True)
    target = torch.softmax(torch.randn(4, 5), -1)
    loss, ce, kl = cfvit_loss(lc, lf, target)
    want_ce = -(target * lf.log_softmax(-1)).sum(-1).mean()
    pf = lf.softmax(-1)
    want_kl = (pf * (pf.log() - lc.log_softmax(-1))).sum() / 4
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(kl, want_kl)
    # the coarse head never sees the label; KL does not pull the fine output
    grad_f = torch.autograd.grad(kl, lf, allow_unused=True, retain_graph=True)[0]
    assert grad_f is None or torch.all(grad_f == 0)
    assert torch.autograd.grad(ce, lc, allow_unused=True)[0] is None


def test_selection_starts_at_two_thirds_relative():
    from evcli.durations import resolve_duration
    from evcli.methods.coarse2fine.config import CoarseToFineConfig

    start = CoarseToFineConfig().selection_start
    assert resolve_duration(start, 10, 300 * 10) == 201 * 10  # paper: epoch > 200 of 300 (0-based)
    assert resolve_duration(start, 10, 30 * 10) == round(0.67 * 300)  # --epochs 30 rescales it


def _method(**sets):
    from evcli import api

    recipe = api.resolve(
        "coarse2fine",
        recipe_file=None,
        flags={"model.name": "test_vit", "model.patch_size": 2, "data.img_size": 12},
        sets=[f"coarse2fine.{k}={v}" for k, v in sets.items()],
    )
    return api.method_for(recipe)


class _Ctx:
    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        self.classes = [str(i) for i in range(5)]

    def resolve(self, duration: str) -> int:
        from evcli.durations import resolve_duration

        return resolve_duration(duration, 1, self.total)


def test_training_step_switches_informative_selection_on_at_the_start_step():
    method = _method(selection_start="50%", mix_prob=0)
    seen = []

    class Model:
        def __call__(self, x, mode, informative):
            seen.append((mode, informative))
            return torch.zeros(len(x), 5, requires_grad=True), torch.zeros(len(x), 5, requires_grad=True)

    modules = type("M", (), {"model": Model()})()
    batch = (torch.zeros(2, 3, 12, 12), torch.tensor([0, 1]))
    for step in (0, 4, 5, 9):
        out = method.training_step(modules, batch, _Ctx(step, 10))
    assert [s[1] for s in seen] == [False, False, True, True] and seen[0][0] == "both"
    assert set(out.logs) == {"loss_ce", "loss_kl", "informative"}


def test_sweep_sums_add_up_and_match_the_real_early_exit():
    """The engine-owned sweep (per-threshold sums) gives the accuracy the real early-exit run gives."""
    method = _method(sweep="[0.0,0.3,0.6,1.0]", threshold=0.6, coarse_grid=3)
    model = tiny_cfvit(3, 2)
    modules = type("M", (), {"unwrap": lambda self, name: model})()
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    with torch.no_grad():
        whole = method.eval_step(modules, (x, y), None)
        halves = [method.eval_step(modules, (x[s], y[s]), None) for s in (slice(0, 4), slice(4, 8))]
    for key, value in whole.items():
        torch.testing.assert_close(value.double(), (halves[0][key] + halves[1][key]).double())
    metrics = method.summarize({k: v.double() for k, v in whole.items()}, None)
    macs = stage_macs(model)
    with torch.no_grad():
        for eta in (0.0, 0.3, 0.6, 1.0):
            out, go_on = model.early_exit(x, eta)
            acc = 100.0 * float((out.argmax(1) == y).float().mean())
            assert metrics[f"eta{eta:g}/top1"] == pytest.approx(acc)
            assert metrics[f"eta{eta:g}/exit_ratio"] == pytest.approx(1 - float(go_on.float().mean()))
            flops = (macs["coarse"] * 8 + macs["fine"] * int(go_on.sum())) / 8 / 1e9
            assert metrics[f"eta{eta:g}/gflops"] == pytest.approx(flops)
    assert metrics["top1_eta"] == metrics["eta0.6/top1"] and metrics["eta1/exit_ratio"] == 0.0
    assert metrics["eta0/exit_ratio"] == 1.0 and metrics["eta0/gflops"] == pytest.approx(macs["coarse"] / 1e9)


def test_plain_vit_weights_become_a_cfvit():
    """--init-from / --weights of a plain ViT: same blocks and head, pos_embed_coarse resampled, reuse fresh."""
    from timm.layers import resample_abs_pos_embed

    method = _method(coarse_grid=3)
    plain = tiny_vit(12, 2)
    target = tiny_cfvit(3, 2)
    state, notes = method.adapt_weights(dict(plain.state_dict()), target)
    assert any("plain ViT -> CF-ViT" in n for n in notes)
    target.load_state_dict(state, strict=True)
    torch.testing.assert_close(target.blocks[2].mlp.fc1.weight, plain.blocks[2].mlp.fc1.weight)
    want = resample_abs_pos_embed(plain.pos_embed.detach(), new_size=[3, 3], num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed_coarse.detach(), want)
    # with every image going fine and selection off, the fine stage differs from the plain ViT only by the reuse
    with torch.no_grad():
        target.reuse.fc2.weight.zero_()
        target.reuse.fc2.bias.zero_()
        x = torch.randn(2, 3, 12, 12)
        torch.testing.assert_close(target(x, mode="both", informative=False)[1], plain(x), atol=1e-5, rtol=1e-5)


def test_grids_the_model_cannot_take_are_refused():
    from evcli.errors import UsageError

    with pytest.raises(UsageError, match="needs a 6x6 fine token grid"):
        CFViT(tiny_vit(16, 2), 3)
    method = _method(coarse_grid=4)
    with pytest.raises(UsageError, match="image size 12 does not fit a coarse grid of 4"):
        method.coarse_grid(2)
    import timm

    with pytest.raises(UsageError, match="class token"):
        CFViT(
            timm.create_model(
                "vit_small_patch16_224", global_pool="avg", class_token=False, img_size=32, patch_size=4, depth=1
            ),
            4,
        )
    assert math.isfinite(stage_macs(tiny_cfvit(3, 2))["total"])
