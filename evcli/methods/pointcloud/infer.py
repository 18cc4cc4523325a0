"""Inference of point-cloud models, shared by evaluation, ``evcli pointcloud predict`` and Python users:
full-room multi-pass segmentation (every original point inferred at least once, logits averaged), test-time
voting for classification, and a PNG rendering of a cloud coloured by prediction.

    from evcli import api
    from evcli.methods.pointcloud.infer import segment_points, read_cloud
    loaded = api.load("runs/pointcloud/<run>")
    logits = segment_points(loaded.model, read_cloud("room.npy"), loaded.recipe.method)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from evcli.data.points import (
    center_normalize,
    read_cloud,
    sample_points,
    seg_features,
    voxel_passes,
)

__all__ = ["classify_points", "read_cloud", "render_cloud", "segment_points", "smooth_cross_entropy", "vote_logits"]


def smooth_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, eps: float, ignore_index: int = -100
) -> torch.Tensor:
    """OpenPoints' label-smoothed cross-entropy: target probability ``1 - eps``, every other class
    ``eps / (classes - 1)``; mean over targets that are not ``ignore_index``. Logits (B, C) or (B, C, N)."""
    c = logits.shape[1]
    flat = logits.movedim(1, -1).reshape(-1, c).float()
    t = target.reshape(-1)
    keep = t != ignore_index
    flat, t = flat[keep], t[keep]
    if len(t) == 0:
        return logits.sum() * 0.0
    logp = torch.log_softmax(flat, dim=1)
    if eps == 0:
        return torch.nn.functional.nll_loss(logp, t)
    one_hot = torch.zeros_like(logp).scatter_(1, t.view(-1, 1), 1.0)
    soft = one_hot * (1 - eps) + (1 - one_hot) * eps / (c - 1)
    return -(soft * logp).sum(1).mean()


def features_of(pos: torch.Tensor, features: str, height_axis: int) -> torch.Tensor:
    """Classification input features (B, C, P) of points (B, P, 3): xyz, or xyz and height above the lowest
    point along ``height_axis`` (the same as the data pipeline's, on tensors)."""
    x = pos.transpose(1, 2)
    if features == "xyz":
        return x.contiguous()
    h = pos[..., height_axis] - pos[..., height_axis].min(1, keepdim=True).values
    return torch.cat([x, h.unsqueeze(1)], 1)


@torch.no_grad()
def vote_logits(
    model: Any,
    pos: torch.Tensor,
    features: str,
    height_axis: int,
    votes: int = 1,
    scale: tuple[float, float] = (0.9, 1.1),
    seed: int = 0,
) -> torch.Tensor:
    """Classification logits averaged over ``votes`` copies of the batch: the first as it is, the others
    scaled per axis by a random factor in ``scale`` (features recomputed from the scaled points)."""
    out = model(pos, features_of(pos, features, height_axis)).float()
    if votes <= 1:
        return out
    g = torch.Generator().manual_seed(seed)
    for _ in range(votes - 1):
        s = torch.empty(pos.shape[0], 1, 3).uniform_(scale[0], scale[1], generator=g).to(pos.device)
        p2 = pos * s
        out += model(p2, features_of(p2, features, height_axis)).float()
    return out / votes


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def segment_points(model: Any, points: np.ndarray, cfg: Any, num_classes: int | None = None) -> torch.Tensor:
    """Per-point logits (N, classes) of a whole cloud (N, >= 3 columns: x y z [r g b ...]): the cloud is
    voxelised (``cfg.voxel_size``) and split into passes taking the i-th point of every voxel, so every
    original point is inferred at least once; the logits of a point are averaged over its passes."""
    model.eval()
    xyz = np.ascontiguousarray(points[:, :3], np.float32)
    rgb = points[:, 3:6] if points.shape[1] >= 6 else np.full((len(points), 3), 128.0, np.float32)
    dev = _device(model)
    total: torch.Tensor | None = None
    count = torch.zeros(len(points), 1)
    axis = cfg.height_index(training=False)
    for idx in voxel_passes(xyz, cfg.voxel_size):
        sub = xyz[idx] - xyz[idx].min(0)
        feats = seg_features(sub, rgb[idx], cfg.resolved_features(), axis)
        pos = torch.from_numpy(np.ascontiguousarray(sub))[None].to(dev)
        logits = model(pos, torch.from_numpy(feats)[None].to(dev))[0].float().t().cpu()
        if total is None:
            total = torch.zeros(len(points), logits.shape[1])
        t = torch.from_numpy(idx)
        total.index_add_(0, t, logits)
        count.index_add_(0, t, torch.ones(len(t), 1))
    assert total is not None
    return total / count


@torch.no_grad()
def classify_points(model: Any, points: np.ndarray, cfg: Any, votes: int = 1, seed: int = 0) -> torch.Tensor:
    """Class logits (classes,) of one cloud (N, >= 3): ``cfg.num_points`` points (a seeded random subset, or
    points repeated with a warning when the cloud has fewer), normalised as in training, with voting."""
    model.eval()
    rng = np.random.default_rng(seed)
    xyz = sample_points(np.ascontiguousarray(points[:, :3], np.float32), cfg.num_points, rng, "the cloud")
    if cfg.center_normalize:
        xyz = center_normalize(xyz)
    pos = torch.from_numpy(np.ascontiguousarray(xyz))[None].to(_device(model))
    scale = (cfg.vote_scale[0], cfg.vote_scale[1])
    return vote_logits(model, pos, cfg.resolved_features(), cfg.height_index(), votes, scale, seed)[0]


def render_cloud(
    xyz: np.ndarray, labels: np.ndarray, path: Path, title: str, names: list[str] | None = None, max_points: int = 20000
) -> Path:
    """A PNG of the cloud (3-d scatter, one colour per label) with a legend of the labels present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(xyz) > max_points:
        keep = np.random.default_rng(0).choice(len(xyz), max_points, replace=False)
        xyz, labels = xyz[keep], labels[keep]
    cmap = plt.get_cmap("tab20")
    fig = plt.figure(figsize=(6, 6), dpi=100)
    ax = fig.add_subplot(projection="3d")
    colours = cmap(np.asarray(labels) % 20)
    size = float(np.clip(3000.0 / max(len(xyz), 1), 1.5, 12.0))  # small clouds get bigger dots
    ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=colours, s=size, depthshade=False)
    ax.set_box_aspect(np.maximum(np.ptp(xyz, 0), 1e-3 * max(float(np.ptp(xyz)), 1e-9)))  # true proportions
    for lab in np.unique(labels)[:20]:
        name = names[lab] if names and 0 <= lab < len(names) else str(lab)
        ax.scatter([], [], [], color=cmap(lab % 20), label=name)
    ax.legend(loc="upper left", fontsize=7, markerscale=4)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
