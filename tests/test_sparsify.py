"""`evcli sparsify` end to end: the four methods train, export, verify and bench; bad input gets one clear line and
the right exit code; resume is bit-exact for LBC and OptG; --init-from a dense model; --help stays torch-free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evcli.api import resume as prepare_resume
from evcli.api import train as run_training
from evcli.engine.trainer import Trainer
from evcli.errors import Interrupted
from evcli.io.checkpoint import read_safetensors
from evcli.ops.nm import is_nm, nm_mask
from evcli.recipe import resolve_recipe
from evcli.testing import imports_torch, make_image_folder, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, size=16)


def _tiny(folder: Path) -> list[str]:
    return [
        "--model",
        "test_resnet",
        "--img-size",
        "16",
        "-b",
        "4",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--data",
        str(folder),
        "--set",
        "sparsify.update_every=step",
        "--set",
        "train.log_every=1",
    ]


@pytest.mark.parametrize(
    "method_args,nm",
    [
        (["--nm", "2:4"], True),  # lbc by default
        (["--method", "srste", "--nm", "2:4"], True),
        (["--method", "magnitude", "--nm", "1:4"], True),
        (["--sparsity", "0.9"], False),  # optg by default
        (["--method", "magnitude", "--sparsity", "0.8"], False),
    ],
)
def test_methods_train_to_their_pattern(folder: Path, tmp_path: Path, method_args: list[str], nm: bool):
    r = run_cli(["sparsify", *_tiny(folder), *method_args, "-o", str(tmp_path / "run"), "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    m = report["metrics"]
    run = tmp_path / "run"
    assert (run / "sparsity.png").stat().st_size > 1000 and (run / "final.safetensors").exists()
    layers = json.loads((run / "sparsity.json").read_text())["layers"]
    assert len(layers) == 14  # test_resnet: 16 convs/linears minus stem and classifier
    final = load_file(str(run / "final.safetensors"))
    if nm:
        n = 1 if "1:4" in method_args else 2
        assert m["nm_exact"] == 1.0 and m["sparsity"] == pytest.approx(1 - n / 4)
        assert all(is_nm(final[f"{row['layer']}.weight"], n, 4) for row in layers)
        assert torch.count_nonzero(final["fc.weight"]) == final["fc.weight"].numel()  # classifier dense
    else:
        target = float(method_args[-1])
        assert report["method"] in ("optg", "magnitude")
        assert m["sparsity"] == pytest.approx(target, abs=2e-3)
        total = sum(row["weights"] for row in layers)
        zeros = sum(row["weights"] - row["nonzeros"] for row in layers)
        assert zeros / total == pytest.approx(target, abs=2e-3)


def test_lbc_export_verify_pack_bench(folder: Path, tmp_path: Path):
    run = tmp_path / "lbc"
    r = run_cli(["sparsify", *_tiny(folder), "--nm", "2:4", "-o", str(run)])
    assert r.code == 0, r.stderr
    assert "exact 2:4 from epoch" in r.stderr and "dense: conv1.0, fc" in r.stderr
    r = run_cli(["sparsify", "export", str(run), "--which", "last", "--json"])
    assert r.code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] and res["pattern"] == "2:4"
    exported = load_file(res["weights"])
    assert not any("alpha" in k or "score" in k or "mask" in k for k in exported)
    final = load_file(str(run / "final.safetensors"))
    assert all(torch.equal(exported[k], final[k]) for k in final)
    p = res["packed"]
    assert p["layers_ratio"] == pytest.approx(0.5625) and p["layers_ratio"] <= 0.6
    assert p["file_bytes"] == Path(p["packed_file"]).stat().st_size < p["dense_fp16_bytes"]
    from safetensors import safe_open

    with safe_open(p["packed_file"], framework="pt") as fh:
        assert json.loads(fh.metadata()["evcli"])["kind"] == "packed_nm"
        assert "layer1.0.conv1.weight.values" in fh.keys()

    r = run_cli(["sparsify", "verify", res["weights"], "--nm", "2:4"])
    assert r.code == 0, r.stderr
    assert "layer4.0.conv2" in r.stdout and "ok" in r.stdout
    r = run_cli(["sparsify", "verify", res["weights"], "--nm", "1:4", "--json"])
    assert r.code == 1
    out = json.loads(r.stdout)
    assert not out["ok"] and "layer1.0.conv1" in out["failing"]
    assert "error:" in r.stderr and "layer1.0.conv1" in r.stderr

    r = run_cli(["sparsify", "bench", res["weights"], "--batch", "1", "--batch", "4", "--iters", "2", "--json"])
    assert r.code == 0, r.stderr
    b = json.loads(r.stdout)
    assert "CPU" in b["runtime"] and "no CPU speedup is claimed" in b["speed_claim"] and b["speed"] == []
    assert [t["batch"] for t in b["cpu_timing"]] == [1, 4] and all(t["ms"] > 0 for t in b["cpu_timing"])
    assert b["macs_sparse_ideal"] < b["macs_dense"] and b["targeted_nonzeros"] * 2 == b["targeted_weights"]

    r = run_cli(["sparsify", "eval", str(run / "final.safetensors"), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["sparsity"] == pytest.approx(0.5)


def test_optg_export_verifies_stated_sparsity(folder: Path, tmp_path: Path):
    run = tmp_path / "optg"
    r = run_cli(["sparsify", *_tiny(folder), "--method", "optg", "--sparsity", "0.9", "-o", str(run)])
    assert r.code == 0, r.stderr
    r = run_cli(["sparsify", "export", str(run), "--json"])
    assert r.code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] and res["packed"] is None
    assert run_cli(["sparsify", "verify", res["weights"]]).code == 0
    r = run_cli(["sparsify", "verify", res["weights"], "--sparsity", "0.95"])
    assert r.code == 1 and "overall sparsity" in r.stderr


def test_vit_lbc_uses_linear_layers(tmp_path: Path, folder: Path):
    args = _tiny(folder)
    args[1] = "test_vit"
    r = run_cli(["sparsify", *args, "--patch-size", "4", "--max-steps", "2", "-o", str(tmp_path / "vit"), "--json"])
    assert r.code == 0, r.stderr
    assert "on 24 layers" in r.stderr and "patch_embed.proj" in r.stderr
    assert json.loads(r.stdout)["metrics"]["nm_exact"] == 1.0


BAD = [
    (["--nm", "5:4"], 2, "N < M"),
    (["--nm", "2:0"], 2, "M >= 1"),
    (["--nm", "a:b"], 2, "must look like 2:4"),
    (["--nm", "2-4"], 2, "must look like 2:4"),
    (["--nm", "2:4", "--sparsity", "0.9"], 2, "cannot be combined"),
    (["--sparsity", "1.5"], 2, "must be in (0, 1)"),
    (["--sparsity", "0"], 2, "must be in (0, 1)"),
    (["--sparsity", "-0.2"], 2, "must be in (0, 1)"),
    (["--method", "optg"], 2, "needs --sparsity"),
    (["--method", "lbc", "--sparsity", "0.5"], 2, "trains N:M"),
    (["--nm", "3:7"], 2, "has no layer that can take 3:7"),
    (["--set", "sparsify.targets=re:nothing"], 2, None),
    (["--set", "sparsify.t_i=60%", "--set", "sparsify.t_f=50%"], 2, "must come after"),
]


@pytest.mark.parametrize("args,code,message", BAD)
def test_bad_input_one_line_and_exit_code(folder: Path, tmp_path: Path, args: list[str], code: int, message: str):
    r = run_cli(["sparsify", *_tiny(folder), *args, "-o", str(tmp_path / "bad")])
    assert r.code == code, r.stderr
    assert r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    if message:
        assert message in r.stderr


def test_bad_targets_pattern_in_recipe(tmp_path: Path, folder: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("evcli: 1\ncommand: sparsify\nsparsify:\n  targets: ['re:layer[1-4']\n")
    r = run_cli(["sparsify", *_tiny(folder), "--recipe", str(recipe)])
    assert r.code == 2 and "bad regular expression" in r.stderr
    recipe.write_text("evcli: 1\ncommand: sparsify\nsparsify:\n  ignore: [nope_layer]\n")
    r = run_cli(["sparsify", *_tiny(folder), "--recipe", str(recipe), "-o", str(tmp_path / "x")])
    assert r.code == 2 and "matches no Conv2d/Linear layer" in r.stderr


def test_verify_bad_files(tmp_path: Path):
    w = torch.randn(4, 8)
    save_file({"a.weight": w, "b.weight": w * nm_mask(w, 2, 4)}, str(tmp_path / "foreign.safetensors"))
    r = run_cli(["sparsify", "verify", str(tmp_path / "foreign.safetensors"), "--nm", "2:4"])
    assert r.code == 1 and "error:" in r.stderr and "1 failing: a" in r.stderr
    r = run_cli(["sparsify", "verify", str(tmp_path / "foreign.safetensors"), "--nm", "5:4"])
    assert r.code == 2 and "N < M" in r.stderr
    r = run_cli(["sparsify", "verify", str(tmp_path / "foreign.safetensors")])
    assert r.code == 2 and "--nm 2:4" in r.stderr
    (tmp_path / "model.pt").write_bytes(b"\x80\x04junk")
    r = run_cli(["sparsify", "verify", str(tmp_path / "model.pt"), "--nm", "2:4"])
    assert r.code == 3 and "never unpickles" in r.stderr
    r = run_cli(["sparsify", "verify", str(tmp_path / "missing.safetensors"), "--nm", "2:4"])
    assert r.code == 3


def test_init_from_dense_weights_magnitude_mask(tmp_path: Path, folder: Path):
    import timm

    from evcli.io.checkpoint import save_weights

    torch.manual_seed(3)
    dense = timm.create_model("test_resnet", num_classes=3)
    save_weights(tmp_path / "dense.safetensors", dense.state_dict(), {})
    args = _tiny(folder) + ["--method", "magnitude", "--nm", "2:4", "--lr", "1e-12", "--max-steps", "1"]
    r = run_cli(["sparsify", *args, "--init-from", str(tmp_path / "dense.safetensors"), "-o", str(tmp_path / "r")])
    assert r.code == 0, r.stderr
    assert "weights: loaded" in r.stderr
    final = load_file(str(tmp_path / "r" / "final.safetensors"))
    w = dense.state_dict()["layer2.0.conv2.weight"]
    # the one-shot mask at t_i = 0 is the 2:4 magnitude mask of the loaded dense weights (ASP style)
    assert torch.equal(final["layer2.0.conv2.weight"] != 0, nm_mask(w, 2, 4).bool())


def _flags(folder: Path, out: Path, **extra: object) -> dict:
    flags = {
        "model.name": "test_resnet",
        "data.img_size": 16,
        "data.path": str(folder),
        "data.batch_size": 4,
        "data.workers": 0,
        "data.hflip": 0.0,
        "schedule.epochs": 3,
        "schedule.warmup": "2step",
        "train.eval_every": "1ep",
        "train.log_every": 1,
        "out.dir": str(out),
    }
    flags.update(extra)
    return flags


def _stop_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = Trainer._train_step

    def patched(self: Trainer, batches):  # noqa: ANN001
        out = original(self, batches)
        if self.ctx.step + 1 == step:
            self._interrupt = True
        return out

    monkeypatch.setattr(Trainer, "_train_step", patched)


@pytest.mark.parametrize(
    "extra",
    [
        {"sparsify.method": "lbc", "sparsify.nm": "2:4"},
        {"sparsify.method": "optg", "sparsify.sparsity": 0.8},
    ],
    ids=["lbc", "optg"],
)
def test_resume_after_interrupt_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict):
    small = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=16, val_per_class=1)
    full = run_training(resolve_recipe("sparsify", flags=_flags(small, tmp_path / "full", **extra)))
    assert full["steps"] == 9  # 12 images / batch 4 = 3 steps per epoch, 3 epochs (schedule per epoch)
    with monkeypatch.context() as m:
        _stop_at(m, 4)  # mid-epoch 1, after LBC's first removal / OptG's second mask
        with pytest.raises(Interrupted):
            run_training(resolve_recipe("sparsify", flags=_flags(small, tmp_path / "split", **extra)))
    recipe, ckpt = prepare_resume("sparsify", tmp_path / "split", {}, [], force=False)
    resumed = run_training(recipe, resume_from=ckpt)
    a, b = (
        load_file(str(tmp_path / "full" / "final.safetensors")),
        load_file(str(tmp_path / "split" / "final.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, _ = read_safetensors(tmp_path / "full" / "checkpoints" / "last.safetensors", "checkpoint")
    sb, _ = read_safetensors(tmp_path / "split" / "checkpoints" / "last.safetensors", "checkpoint")
    site_keys = [k for k in sa if ".evcli_site." in k]  # scores and masks live in the model's state
    assert site_keys and all(torch.equal(sa[k], sb[k]) for k in site_keys)
    assert full["metrics"] == resumed["metrics"]
    if extra["sparsify.method"] == "lbc":
        meta = read_safetensors(tmp_path / "split" / "checkpoints" / "last.safetensors", "checkpoint")[1]
        assert meta["state"]["method"]["k"] == 5 and meta["state"]["method"]["frozen"] is True


def test_tiny_recipes_run(tmp_path: Path, folder: Path):
    for name in ("sparsify/tiny_lbc", "sparsify/tiny_optg"):
        r = run_cli(["sparsify", "--recipe", name, "--data", str(folder), "-o", str(tmp_path / name), "--json"])
        assert r.code == 0, r.stderr
        assert json.loads(r.stdout)["steps"] == 3  # 24 images / batch 8: one epoch ends before max_steps 4


@pytest.mark.parametrize(
    "args", [["sparsify", "--help"], ["sparsify", "verify", "--help"], ["sparsify", "bench", "--help"]]
)
def test_help_does_not_import_torch(args: list[str]):
    imported, out = imports_torch(args)
    assert not imported and "Usage" in out


@pytest.mark.slow
def test_design_card_example_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`evcli sparsify --nm 2:4 --model resnet50` on the built-in data (several minutes on 2 cores)."""
    monkeypatch.chdir(tmp_path)
    r = run_cli(["sparsify", "--nm", "2:4", "--model", "resnet50", "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["metrics"]["nm_exact"] == 1.0 and report["metrics"]["top1"] > 10.0


@pytest.mark.slow
def test_two_processes_through_accelerate_launch(tmp_path: Path, folder: Path):
    """LBC scores are parameters of the DDP-wrapped model (see test_scores_are_model_parameters); 2 CPU processes."""
    from evcli.testing import launch_two_processes

    proc = launch_two_processes(["sparsify", *_tiny(folder), "-o", str(tmp_path / "ddp"), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["processes"] == 2 and report["metrics"]["nm_exact"] == 1.0


def _attached(flags: dict):
    import timm

    from evcli.methods.sparsify.method import SparsifyMethod

    method = SparsifyMethod(resolve_recipe("sparsify", flags=flags))
    model = timm.create_model("test_resnet", num_classes=3)
    method.attach_to(model)
    return method, model


def test_scores_are_model_parameters():
    """DDP all-reduces only the wrapped model's parameters: scores elsewhere would drift apart between ranks."""
    for flags in ({"sparsify.nm": "2:4"}, {"sparsify.sparsity": 0.9}):
        method, model = _attached(flags)
        params = {id(p) for p in model.parameters()}
        scores = [p for site in method.sites.values() for p in site.parameters()]
        assert scores and all(id(p) in params for p in scores)


@pytest.mark.parametrize(("ties", "realized"), [("weight", 0.34), ("keep", 0.0)])
def test_optg_masks_reach_each_epochs_target_when_scores_tie(ties: str, realized: float):
    """All scores 0 (taps that only see padding never get a gradient): the epoch's sparsity is still realized,
    ties pruned by the lowest |W|; the reference rule keeps ties (and trains dense), and the logs say so."""
    method, model = _attached({"sparsify.sparsity": 0.9, "sparsify.optg_ties": ties})
    method._set_optg_masks(0.34)
    total = sum(site.mask.numel() for site in method.sites.values())
    zeros = sum(int((site.mask == 0).sum()) for site in method.sites.values())
    assert zeros / total == pytest.approx(realized, abs=1.0 / total)
    assert method.p_e == 0.34 and method.p_realized == pytest.approx(realized, abs=1.0 / total)
    if ties == "weight":  # the smallest |W| of the whole model went first
        pruned = torch.cat(
            [m.weight.detach().abs()[s.mask == 0] for m, s in zip(method.layer_modules.values(), method.sites.values())]
        )
        kept = torch.cat(
            [m.weight.detach().abs()[s.mask == 1] for m, s in zip(method.layer_modules.values(), method.sites.values())]
        )
        assert pruned.max() <= kept.min()
    method._set_optg_masks(0.9)  # the target itself: exact either way
    zeros = sum(int((site.mask == 0).sum()) for site in method.sites.values())
    assert zeros == round(0.9 * total)


def test_optg_fixed_tail_keeps_one_mask_to_the_end():
    """optg_fixed_tail: the masks are set at exactly p when the tail starts and stay fixed (later epochs and the
    end of training do not re-rank the still-training scores); without a tail the end sets exactly p."""
    from types import SimpleNamespace

    method, model = _attached({"sparsify.sparsity": 0.9, "sparsify.optg_fixed_tail": "2ep", "schedule.epochs": 6})
    ctx = SimpleNamespace(steps_per_epoch=10, total_steps=60, step=0, resolve=lambda d: 20 if str(d) == "2ep" else 0)
    sites = list(method.sites.values())
    for epoch in range(4):
        ctx.step = 10 * epoch
        method.update_schedule(ctx)
    assert method.p_e < 0.9
    ctx.step = 40  # the tail
    method.update_schedule(ctx)
    assert method.p_e == 0.9 and method.p_realized == pytest.approx(0.9, abs=1e-3)
    tail_masks = [s.mask.clone() for s in sites]
    with torch.no_grad():
        for s in sites:
            s.scores.copy_(torch.randn_like(s.scores))  # the scores keep learning in the tail
    ctx.step = 50
    method.update_schedule(ctx)
    method._finish_schedule(ctx)
    assert all(torch.equal(s.mask, m) for s, m in zip(sites, tail_masks))
    # the paper's schedule (no tail): the end of training re-ranks once, at exactly p
    method, model = _attached({"sparsify.sparsity": 0.9})
    ctx = SimpleNamespace(steps_per_epoch=10, total_steps=40, step=30, resolve=lambda d: 0)
    method.update_schedule(ctx)
    assert method.p_e < 0.9
    method._finish_schedule(ctx)
    assert method.p_e == 0.9


def test_lbc_training_mask_matches_the_card_formula():
    """m = 1[(α ⊙ 1[α≠0]) Π ≠ 0] with a straight-through gradient: the fused function gives the composed ops'
    mask and dL/dα, and removed (zero) scores get no loss gradient."""
    from evcli.methods.sparsify.layers import LBCSite

    torch.manual_seed(0)
    for n, m in ((2, 4), (1, 4), (2, 8)):
        site = LBCSite(torch.Size([4, 16, 3, 3]), n, m)
        with torch.no_grad():
            site.alpha.copy_(torch.randn_like(site.alpha))
            site.alpha[torch.rand_like(site.alpha) < 0.4] = 0.0
        upstream = torch.randn(site.alpha.shape[0], m)
        fused = site.mask()
        (fused * upstream).sum().backward()
        a = site.alpha.detach().clone().requires_grad_(True)
        s = (a * (a != 0).to(a.dtype)) @ site.table
        composed = (s != 0).to(a.dtype)
        (s * upstream).sum().backward()  # the straight-through binarisation passes the gradient to s
        assert torch.equal(fused.detach(), composed)
        assert torch.allclose(site.alpha.grad, a.grad, atol=1e-6)
        assert torch.all(site.alpha.grad[site.alpha == 0] == 0) and site.alpha.grad.abs().sum() > 0


def test_lbc_removal_equals_a_full_topk_every_step(monkeypatch):
    """The removal reuses last step's choice where it is still strictly the k lowest; over steps that revive
    removed scores, move survivors across them, tie them, and raise k, it zeroes exactly what a top-k over all
    groups zeroes."""
    from evcli.methods.sparsify.layers import LBCSite

    topk = torch.topk

    def reference(alpha: torch.Tensor, k: int) -> torch.Tensor:
        a = alpha.clone()
        a[a == 0] = float("-inf")
        return torch.zeros_like(a, dtype=torch.bool).scatter(1, topk(a, k, dim=1, largest=False).indices, True)

    ranked = []
    monkeypatch.setattr(torch, "topk", lambda t, *a, **kw: (ranked.append(t.shape[0]), topk(t, *a, **kw))[1])
    torch.manual_seed(0)
    site = LBCSite(torch.Size([8, 16, 3, 3]), 2, 4)
    with torch.no_grad():
        site.alpha.copy_(torch.rand_like(site.alpha) + 0.1)
    schedule = [1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5]
    for step, k in enumerate(schedule):
        expected = site.alpha.detach().masked_fill(reference(site.alpha.detach(), k), 0.0)
        site.remove(k)
        assert torch.equal(site.alpha.detach(), expected), f"step {step}, k {k}"
        assert int((site.alpha == 0).sum(1).min()) >= k
        with torch.no_grad():  # an optimizer step
            zero = site.alpha == 0
            site.alpha.add_(torch.randn_like(site.alpha) * 0.05)
            site.alpha[zero] = torch.randn(int(zero.sum())) * 1e-3  # momentum revives the removed ones
            site.alpha[:5] = 0.25  # tied groups
            site.alpha[5:8, 0] = 0.0  # an exact zero among the survivors
            if step % 3 == 2:
                site.alpha[8:40] = site.alpha[8:40].flip(1)  # survivors fall below the removed ones
    groups = site.alpha.shape[0]
    assert 0 < sum(ranked) < len(schedule) * groups  # the top-k ran on the changed groups only


def test_lbc_does_no_mask_work_once_frozen():
    """After t_f the scores are frozen: no re-zeroing, no mask recomputation on any later step."""
    method, model = _attached({"sparsify.nm": "2:4"})
    site = next(iter(method.sites.values()))
    method.k = site.combos - 1
    method.frozen = True
    method._freeze()
    method._rezero()  # the last pass, at the freeze
    x = torch.randn(2, 3, 16, 16)
    model(x)
    versions = [s.alpha._version for s in method.sites.values()]
    caches = [s._cache for s in method.sites.values()]
    for _ in range(3):
        method._rezero()  # what every later training step and optimizer step call
        model(x)
    assert [s.alpha._version for s in method.sites.values()] == versions
    assert all(s._cache is c for s, c in zip(method.sites.values(), caches))
    assert all(
        is_nm(s.masked_weight(m.weight), 2, 4) for m, s in zip(method.layer_modules.values(), method.sites.values())
    )


def test_lbc_rezeroes_once_per_change_of_the_scores(monkeypatch):
    """The per-iteration removal runs once per optimizer step (after it, which also covers the next forward), not
    again before the forward on unchanged scores; a score that momentum revived is zeroed again."""
    method, model = _attached({"sparsify.nm": "2:4"})
    site = next(iter(method.sites.values()))
    method.k = 2
    calls = []
    original = type(site).remove
    monkeypatch.setattr(type(site), "remove", lambda self, k: (calls.append(k), original(self, k)))
    method._rezero()
    assert len(calls) == len(method.sites)
    method._rezero()  # the forward after: nothing changed
    assert len(calls) == len(method.sites)
    zeroed = site.alpha == 0
    assert int(zeroed.sum()) == 2 * site.alpha.shape[0]
    with torch.no_grad():
        site.alpha[zeroed] = 1e-6  # an optimizer step: momentum revived the removed scores (smallest still)
    method._rezero()
    assert len(calls) == 2 * len(method.sites)
    assert torch.equal(site.alpha == 0, zeroed)
    method.k = 3  # the schedule removed one more combination
    method._rezero()
    assert len(calls) == 3 * len(method.sites) and int((site.alpha == 0).sum()) == 3 * site.alpha.shape[0]


def test_verify_reads_a_qat_integer_export(tmp_path: Path):
    """sparsify -> qat: the integer levels of the kept layers are checked against the pattern the file names."""
    from evcli.io.checkpoint import save_safetensors
    from evcli.methods.qat.export import pack_levels

    levels = torch.randint(-8, 8, (8, 16)).to(torch.int8)
    levels = (levels * nm_mask(levels.float(), 2, 4)).to(torch.int8)
    dense = torch.randint(1, 8, (4, 8)).to(torch.int8)  # the classifier: 8-bit, never sparse
    meta = {
        "kind": "qat_int",
        "layers": {
            "fc1": {"shape": [8, 16], "weight_bits": 4, "packed": True},
            "head": {"shape": [4, 8], "weight_bits": 8, "packed": False},
        },
        "sparse": {"pattern": "2:4", "nm": "2:4", "layers": ["fc1"]},
    }
    tensors = {"fc1.weight_q": pack_levels(levels, 4), "fc1.weight_scale": torch.tensor(0.1),
               "head.weight_q": dense, "head.weight_scale": torch.tensor(0.1)}  # fmt: skip
    save_safetensors(tmp_path / "int.safetensors", tensors, meta)
    r = run_cli(["sparsify", "verify", str(tmp_path / "int.safetensors"), "--json"])
    assert r.code == 0, r.stderr
    assert [row["layer"] for row in json.loads(r.stdout)["layers"]] == ["fc1"]
    broken = levels.clone()
    broken[0, :4] = 3  # one group of four with no zero
    save_safetensors(tmp_path / "bad.safetensors", {**tensors, "fc1.weight_q": pack_levels(broken, 4)}, meta)
    r = run_cli(["sparsify", "verify", str(tmp_path / "bad.safetensors")])
    assert r.code == 1 and "fc1" in r.stderr
