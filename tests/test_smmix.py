"""SMMix: the card's invariants on hand-made tensors, the model adapters, the run, export and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from evcli.errors import UsageError
from evcli.methods.mix import smmix as sm
from evcli.testing import TINY_ARGS, interrupt_after, launch_two_processes, make_image_folder, run_cli


@pytest.mark.parametrize(("s", "expected"), [(14, list(range(3, 11))), (7, [1, 2, 3, 4, 5]), (8, [2, 3, 4, 5, 6])])
def test_side_range_matches_the_card(s: int, expected: list[int]):
    assert sm.side_range(s, 0.25, 0.75) == expected


def test_side_range_too_small_grid():
    assert sm.side_range(2, 0.25, 0.75) == [1]
    with pytest.raises(UsageError, match="too small"):
        sm.side_range(1, 0.25, 0.75)


def test_patch_scores_are_attention_received_from_patch_queries():
    attn = torch.zeros(1, 2, 5, 5)  # 1 prefix token + 4 patches
    attn[0, :, 1:, 3] = 1.0  # every patch query attends patch 2 (token 3)
    attn[0, :, 0, 1] = 1.0  # the class token's attention must not count
    adapter = sm.TokenGridAdapter("vit", torch.nn.Identity(), 1, 1, 4)
    assert adapter.patch_scores(attn).tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_window_search_and_tokens():
    s, r = 4, 2
    scores = torch.ones(1, s * s)
    scores[0, [0, 1, 4, 5]] = 0.0  # top-left 2x2 least attended
    scores[0, [10, 11, 14, 15]] = 5.0  # bottom-right 2x2 most attended
    win_min, win_max = sm.window_search(scores, s, r)
    assert win_min.tolist() == [0] and win_max.tolist() == [8]  # window ids over a 3x3 window grid
    assert sm.window_tokens(win_min, s, r).tolist() == [[0, 1, 4, 5]]
    assert sm.window_tokens(win_max, s, r).tolist() == [[10, 11, 14, 15]]


def test_paste_is_patch_aligned_and_from_the_partner():
    torch.manual_seed(0)
    b, s, p, r = 4, 4, 3, 2
    images = torch.randn(b, 3, s * p, s * p)
    scores = torch.rand(b, s * s)
    mixed = sm.smmix_images(images, scores, s, r)
    assert mixed.lam == pytest.approx((16 - 4) / 16)
    assert mixed.source_mask.sum(1).tolist() == [r * r] * b
    assert torch.equal(mixed.target_mask, ~mixed.source_mask)
    for i in range(b):
        j = b - 1 - i
        for dst, src in zip(mixed.dst_tokens[i].tolist(), mixed.src_tokens[i].tolist()):
            dr, dc = divmod(dst, s)
            sr, sc = divmod(src, s)
            got = mixed.images[i, :, dr * p : (dr + 1) * p, dc * p : (dc + 1) * p]
            assert torch.equal(got, images[j, :, sr * p : (sr + 1) * p, sc * p : (sc + 1) * p])
        keep = mixed.target_mask[i].view(s, s).repeat_interleave(p, 0).repeat_interleave(p, 1)
        assert torch.equal(mixed.images[i][:, keep], images[i][:, keep])
    # destination = the image's least-attended window, source = the partner's most-attended one
    win_min, win_max = sm.window_search(scores, s, r)
    assert torch.equal(mixed.dst_tokens, sm.window_tokens(win_min, s, r))
    assert torch.equal(mixed.src_tokens, sm.window_tokens(win_max, s, r).flip(0))


def test_consistency_mixes_logits_not_probabilities():
    clean = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    lam = 0.75
    target_logits = lam * clean + (1 - lam) * clean.flip(0)
    assert sm.consistency_kl(target_logits, clean, lam).item() == pytest.approx(0.0, abs=1e-7)
    mixed = torch.tensor([[0.5, 0.5, 0.0], [1.0, -1.0, 0.0]])
    p = F.softmax(target_logits, -1)
    expected = (p * (p.log() - F.log_softmax(mixed, -1))).sum() / 2
    assert sm.consistency_kl(mixed, clean, lam).item() == pytest.approx(expected.item(), rel=1e-6)
    prob_mix = lam * F.softmax(clean, -1) + (1 - lam) * F.softmax(clean.flip(0), -1)
    assert not torch.allclose(p, prob_mix)


def test_smoothed_targets():
    t = sm.smooth_one_hot(torch.tensor([1]), 4, 0.1)
    assert t.tolist()[0] == pytest.approx([0.025, 0.925, 0.025, 0.025]) and t.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "kwargs", "img", "grid", "attn_shape"),
    [
        ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2}, 32, 8, (2, 3, 65, 65)),
        ("cait_xxs24_224", {"img_size": 32, "patch_size": 4, "depth": 2}, 32, 8, (2, 4, 64, 64)),
        ("pvt_v2_b0", {}, 128, 4, (2, 8, 16, 16)),
        ("vit_small_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, 32, 4, (2, 6, 17, 17)),
    ],
)
def test_adapters_find_grid_and_attention(name: str, kwargs: dict, img: int, grid: int, attn_shape: tuple):
    model = timm.create_model(name, num_classes=5, **kwargs)
    adapter = sm.TokenGridAdapter.for_model(model, name)
    assert adapter.grid_side(img) == grid
    wrapped = sm.SMMixModel(model, adapter, 5).eval()
    x = torch.randn(2, 3, img, img)
    fused = getattr(adapter.attention, "fused_attn", None)
    with torch.no_grad(), adapter.capture() as maps:
        logits = wrapped(x)
    assert logits.shape == (2, 5) and tuple(maps[-1].shape) == attn_shape
    # per-head softmax maps (CaiT: before talking-heads mixing, which makes them no distributions)
    assert maps[-1].min() >= 0 and torch.allclose(maps[-1].sum(-1), torch.ones(attn_shape[:3]), atol=1e-5)
    assert adapter.patch_scores(maps[-1]).shape == (2, grid * grid)
    assert getattr(adapter.attention, "fused_attn", None) == fused  # restored after the motivating pass
    with torch.no_grad():
        wrapped(x)
    assert len(maps) == 1  # the hook is gone
    mask = torch.zeros(2, grid * grid, dtype=torch.bool)
    mask[:, :3] = True
    out, z_t, z_s = wrapped(x, ~mask, mask)
    assert z_t.shape == z_s.shape == (2, 5)


def test_non_vit_model_is_refused_with_what_it_lacks():
    with pytest.raises(UsageError, match="self-attention over a uniform patch-token grid"):
        sm.TokenGridAdapter.for_model(timm.create_model("resnet18", num_classes=3), "resnet18")


def test_cli_smmix_trains_saves_picture_and_exports_plain_backbone(tmp_path: Path):
    run = tmp_path / "run"
    r = run_cli(
        [
            "mix",
            *TINY_ARGS,
            "--method",
            "smmix",
            "--max-steps",
            "4",
            "--save-mixed",
            "4",
            "-o",
            str(run),
            "--json",
            "--set",
            "mix.switch_prob=1.0",
        ]
    )
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["method"] == "smmix"
    picture = Image.open(run / "smmix_mixed.png")
    assert picture.size[0] > 4 * 96
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "loss_fine" in x]
    assert records and all(math.isfinite(x["loss_consistency"]) for x in records)
    weights = load_file(str(run / "final.safetensors"))
    plain = timm.create_model("test_vit", num_classes=10, img_size=16, patch_size=4)
    assert set(weights) == set(plain.state_dict())  # token head dropped
    plain.load_state_dict(weights)
    ckpt = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert "module.model.token_head.weight" in ckpt  # ...but trained and checkpointed
    r = run_cli(["mix", "eval", str(run / "final.safetensors"), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["top1"] == pytest.approx(report["metrics"]["top1"])


def test_smmix_resume_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from evcli.api import resume as prepare_resume
    from evcli.api import train as run_training
    from evcli.recipe import resolve_recipe
    from evcli.testing import TINY_FLAGS

    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    flags = {
        **TINY_FLAGS,
        "data.path": str(data),
        "data.batch_size": 4,
        "schedule.max_steps": None,
        "schedule.epochs": 2,
        "mix.method": "smmix",
        "model.drop_path": 0.1,
    }
    run_training(resolve_recipe("mix", flags={**flags, "out.dir": str(tmp_path / "full")}))
    interrupt_after(monkeypatch, 5)
    with pytest.raises(Exception, match="interrupted"):
        run_training(resolve_recipe("mix", flags={**flags, "out.dir": str(tmp_path / "split")}))
    monkeypatch.undo()
    recipe, ckpt = prepare_resume("mix", tmp_path / "split", {}, [], force=False)
    run_training(recipe, resume_from=ckpt)
    a, b = (
        load_file(str(tmp_path / "full" / "final.safetensors")),
        load_file(str(tmp_path / "split" / "final.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--model", "resnet18", "--set", "model.patch_size=null"], 2, "'resnet18' (ResNet) has none"),
        (["-b", "7"], 2, "even batch size"),
        (["--img-size", "18"], 2, "not divisible by the model's patch size 4"),
        (["--save-mixed", "9"], 2, "mix.save_mixed (9) must be between 0 and the batch size (8)"),
    ],
)
def test_smmix_bad_input(tmp_path: Path, args: list[str], code: int, text: str):
    r = run_cli(["mix", *TINY_ARGS, "--method", "smmix", *args, "-o", str(tmp_path / "r")])
    assert r.code == code, r.stderr
    assert text in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_smmix_two_processes(tmp_path: Path):
    """DDP must tolerate the token head being idle on Mixup steps (find_unused_parameters)."""
    args = ["mix", *TINY_ARGS, "--method", "smmix", "--max-steps", "3", "-o", str(tmp_path / "ddp"), "--json"]
    proc = launch_two_processes(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["processes"] == 2


def test_token_head_starts_like_the_reference_head():
    model = timm.create_model("deit_tiny_patch16_224", num_classes=100, img_size=32, patch_size=4, depth=1)
    head = sm.SMMixModel(model, sm.TokenGridAdapter.for_model(model), 100).token_head
    assert torch.count_nonzero(head.bias) == 0
    assert 0.015 < head.weight.std().item() < 0.025  # PyTorch's default for 192 inputs: 0.042


def test_smmix_decays_what_the_plain_runs_decay():
    from evcli.engine.method import decay_groups

    model = timm.create_model("deit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=4, depth=1)
    wrapped = sm.SMMixModel(model, sm.TokenGridAdapter.for_model(model), 5)
    names = {id(p): n for n, p in wrapped.named_parameters()}
    plain = {id(p) for p in decay_groups(model, 0.05)[1]["params"]}
    smmix = {id(p) for p in decay_groups(wrapped, 0.05)[1]["params"]}
    assert plain <= smmix and {"backbone.pos_embed", "backbone.cls_token"} <= {names[i] for i in smmix}
    assert smmix - plain == {id(wrapped.token_head.bias)}  # only the new head's bias joins the no-decay group


def test_smmix_loss_assembly(monkeypatch: pytest.MonkeyPatch):
    """L = CE(class logits, lam-mixed target) + CE(z_target, own) + CE(z_source, partner's) + KL, term by term."""
    import numpy as np

    from evcli.engine.method import Modules
    from evcli.methods.mix.method import MixMethod
    from evcli.recipe import resolve_recipe

    recipe = resolve_recipe(
        "mix",
        flags={"mix.method": "smmix", "data.img_size": 16, "model.patch_size": 4,
               "mix.switch_prob": 1.0, "mix.fine_weight": 0.7, "mix.consistency_weight": 0.3},
    )  # fmt: skip
    method = MixMethod(recipe)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, depth=1)
    modules = {"model": model}
    ctx = type("Ctx", (), {"run_dir": None, "rank": 0, "classes": None, "num_classes": 4})()
    monkeypatch.setattr(method, "num_classes", lambda ctx: 4)
    method.transform(modules, ctx)
    view = Modules(modules, {})
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    np.random.seed(5)
    out = method._smmix_step(view, x, y, ctx)
    np.random.seed(5)
    net = modules["model"]
    net.eval()
    with torch.no_grad(), net.adapter.capture() as maps:
        clean = net(x)
    net.train()
    r = method.sides[np.random.randint(len(method.sides))]
    mixed = sm.smmix_images(x, net.adapter.patch_scores(maps[-1]), method.grid, r)
    own = sm.smooth_one_hot(y, 4, 0.1)
    logits, z_t, z_s = net(mixed.images, mixed.target_mask, mixed.source_mask)
    l_cls = -(F.log_softmax(logits, -1) * (mixed.lam * own + (1 - mixed.lam) * own.flip(0))).sum(-1).mean()
    l_fine = 0.5 * (
        -(F.log_softmax(z_t, -1) * own).sum(-1).mean() - (F.log_softmax(z_s, -1) * own.flip(0)).sum(-1).mean()
    )
    l_con = sm.consistency_kl(logits, clean, mixed.lam)
    assert torch.allclose(out.logs["loss_fine"], l_fine.detach(), atol=1e-6)
    assert torch.allclose(out.loss, l_cls + 0.7 * l_fine + 0.3 * l_con, atol=1e-6)
