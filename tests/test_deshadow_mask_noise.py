"""`deshadow.mask_noise`: detector-like input masks in training (border moved, a false region added, the ground
truth unchanged), the val's noisy_* metrics under such masks, and exact resumes with it on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from evcli.data.shadow import noisy_mask, noisy_masks
from evcli.methods.deshadow.method import eval_noisy_masks
from evcli.testing import interrupt_after, run_cli

NOISY = ["deshadow", "train", "--recipe", "deshadow/tiny", "--set", "deshadow.mask_noise=1"]


def _square(size: int = 48) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[:, 16:32, 16:32] = 1.0
    return m


def _image(seed: int = 0, size: int = 48) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((3, size, size), dtype=np.float32))


def _grow(m: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(m[None], 2 * r + 1, stride=1, padding=r)[0]


def test_noisy_mask_moves_the_border_by_at_most_4px_and_adds_a_false_region():
    mask, img = _square(), _image()
    core = 1.0 - _grow(1.0 - mask, 4)  # the mask eroded by 4 px: always kept
    ring = _grow(mask, 4)  # the mask dilated by 4 px
    far_added = 0
    for seed in range(12):
        out = noisy_mask(mask, img, np.random.default_rng(seed))
        assert out.shape == mask.shape and set(out.unique().tolist()) <= {0.0, 1.0}
        assert bool((out >= core).all())  # the true shadow stays masked (up to a 4 px border)
        far_added += int((out * (1 - ring)).sum() > 0)  # a false region beyond the moved border
        again = noisy_mask(mask, img, np.random.default_rng(seed))
        assert torch.equal(out, again)  # one generator, one mask
    assert far_added >= 9  # nearly every corruption adds a false alarm (some fall on the mask itself)
    assert torch.equal(mask, _square())  # the input is not modified in place


def test_noisy_masks_applies_with_probability_p():
    masks = _square().expand(8, -1, -1)[:, None].clone()
    imgs = torch.stack([_image(i) for i in range(8)])
    assert torch.equal(noisy_masks(masks, imgs, 0.0, np.random.default_rng(0)), masks)
    out = noisy_masks(masks, imgs, 1.0, np.random.default_rng(0))
    assert all(not torch.equal(out[i], masks[i]) for i in range(8))
    assert torch.equal(masks, _square().expand(8, -1, -1)[:, None])


def test_eval_noisy_masks_do_not_depend_on_batching():
    masks = torch.stack([_square(), _square(), _square()])
    imgs = torch.stack([_image(i) for i in range(3)])
    whole = eval_noisy_masks(masks, imgs, seed=0)
    parts = torch.cat([eval_noisy_masks(masks[i : i + 1], imgs[i : i + 1], seed=0) for i in range(3)])
    assert torch.equal(whole, parts)
    # each image its own corruption (border shift, false region), not one shared by all: images that differ by
    # a few float ulps (the same pixels for the darker-pixels variant) still get different masks
    base = _image(7)
    near = torch.stack([base, base + 1e-7, base + 2e-7, base + 3e-7])
    out = eval_noisy_masks(torch.stack([_square()] * 4), near, seed=0)
    assert all(int((out[i] != out[0]).sum()) > 20 for i in range(1, 4))
    assert not torch.equal(whole, eval_noisy_masks(masks, imgs, seed=1))


def test_training_feeds_the_corrupted_mask_and_the_val_reports_noisy_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from evcli.data import shadow
    from evcli.methods.deshadow.labnet import LABNet

    made: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: list[torch.Tensor] = []
    real_noisy, real_forward = shadow.noisy_masks, LABNet.forward

    def recording_noisy(masks, images, p, rng):  # noqa: ANN001
        out = real_noisy(masks, images, p, rng)
        made.append((masks.clone(), out.clone()))
        return out

    def recording_forward(self, lab, mask):  # noqa: ANN001
        if self.training:
            seen.append(mask.detach().clone())
        return real_forward(self, lab, mask)

    monkeypatch.setattr(shadow, "noisy_masks", recording_noisy)
    monkeypatch.setattr(LABNet, "forward", recording_forward)
    r = run_cli([*NOISY, "-o", str(tmp_path / "run"), "--json"])
    assert r.code == 0, r.stderr
    assert len(made) == 3 and len(seen) == 3  # every training step, and only there
    for (given, out), fed in zip(made, seen):
        assert torch.equal(fed, out.to(fed))  # the network trains on the corrupted mask
        assert not torch.equal(out, given)
    metrics = json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]
    assert {"noisy_lab_mae_s", "noisy_lab_mae_ns", "noisy_lab_mae_all"} <= set(metrics)
    assert metrics["noisy_lab_mae_all"] != metrics["lab_mae_all"]
    assert "images" in metrics and "noisy_images" not in metrics


def test_no_noisy_metrics_without_mask_noise(tmp_path: Path):
    r = run_cli(["deshadow", "train", "--recipe", "deshadow/tiny", "-o", str(tmp_path / "run"), "--json"])
    assert r.code == 0, r.stderr
    metrics = json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]
    assert not any(k.startswith("noisy_") for k in metrics)


def test_resume_with_mask_noise_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    r = run_cli([*NOISY, "-o", str(tmp_path / "full")])
    assert r.code == 0, r.stderr
    interrupt_after(monkeypatch, 2)
    r = run_cli([*NOISY, "-o", str(tmp_path / "partial")])
    monkeypatch.undo()
    assert r.code == 130
    r = run_cli(["deshadow", "train", "--resume", str(tmp_path / "partial")])
    assert r.code == 0, r.stderr
    a = load_file(str(tmp_path / "full" / "final.safetensors"))
    b = load_file(str(tmp_path / "partial" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--set", "model.name=detector", "--set", "deshadow.method=detector"], "the detector has none"),
        (["--set", "deshadow.mask_noise=1.5"], "mask_noise"),
    ],
)
def test_bad_mask_noise_is_one_line(tmp_path: Path, overrides: list[str], message: str):
    r = run_cli([*NOISY, *overrides, "-o", str(tmp_path / "run")])
    assert r.code == 2, (r.code, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
