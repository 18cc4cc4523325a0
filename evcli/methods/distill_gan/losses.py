"""Losses of ``evcli distill-gan``: CRD's content relationships (row strips, column strips and patches of the
output image, matched with relational distances and angles), VGG16 style (Gram) and feature terms, the GAN
losses (LSGAN, hinge, vanilla), and the CycleGAN image pool.

Relational KD (Park et al. 2019, as CRD uses it): each slice of an image is one sample vector. Distance
term: the Euclidean distance matrix of the samples divided by the mean of its positive entries, Smooth-L1
between student and teacher matrices. Angle term: for all ordered triplets (i, j, k) the cosine between the
unit vectors e_ij = (x_j - x_i)/|x_j - x_i| and e_ik, Smooth-L1 between student and teacher. Loss =
1 x distance + 2 x angle. Angles are computed from the Gram matrix (``<x_j - x_i, x_k - x_i> = G_jk - G_ij -
G_ik + G_ii``), an N^3 tensor instead of the N^2 x D difference tensor of the reference code (256 rows of
768 values: 134 MB in float64 instead of 200 MB plus its N^3 product), with the same values. The Gram matrix
and the N^3 terms are computed in float64 on centred samples: in float32 the cancellation in ``G_jk - G_ij -
G_ik + G_ii`` left rounding residues that, divided by the tiny norms of near-equal slices (flat, white or
saturated image regions), gave cosines up to 1e20 and RKD losses up to 1e16 (float64: within 3e-8 of the
direct definition on real generator outputs; about 2.5x the float32 time on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12


def _centred_gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrix of the samples in float64 after subtracting their mean, its diagonal and the squared
    distances ``|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>``. Distances and angles do not change with the centring; the
    rounding error does: slices of a mostly white image are vectors of large norm that differ little, which
    float32 cannot resolve. (Apple's MPS has no float64: there it stays float32, centred.)"""
    x = x.to(torch.float32 if x.device.type == "mps" else torch.float64)
    x = x - x.mean(0, keepdim=True)
    g = x @ x.t()
    diag = g.diagonal()
    return g, diag, diag[:, None] + diag[None, :] - 2.0 * g


def _distances(d2: torch.Tensor) -> torch.Tensor:
    off = 1.0 - torch.eye(len(d2), device=d2.device, dtype=d2.dtype)
    return d2.clamp(min=EPS).sqrt() * off


def _angles(g: torch.Tensor, diag: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    # dot[i, j, k] = <x_j - x_i, x_k - x_i>
    dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + diag[:, None, None]
    tol = 1000 * torch.finfo(g.dtype).eps * (diag[:, None] + diag[None, :]) + EPS
    off = ~torch.eye(len(g), dtype=torch.bool, device=g.device)
    distinct = off & (d2 > tol)  # e_ii and e_ij of equal samples are zero vectors: their cosines are 0
    inv = torch.where(distinct, d2.clamp(min=EPS).rsqrt(), torch.zeros_like(d2))
    return (dot * inv[:, :, None] * inv[:, None, :]).clamp(-1.0, 1.0).reshape(-1)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix [N, N] of samples x [N, D] (squared distances clamped at 1e-12 before the
    root, diagonal exactly 0)."""
    return _distances(_centred_gram(x)[2]).to(x.dtype)


def triplet_angles(x: torch.Tensor) -> torch.Tensor:
    """cos(e_ij, e_ik) for all i, j, k as a flat [N^3] tensor (0 where j = i or k = i).

    Two samples closer than the Gram matrix's rounding error (squared distance below 1000 float64 epsilons of
    their squared norms) count as equal: their unit vector is zero, as ``F.normalize`` gives for an exact zero
    difference; without this a rounding residue over a near-zero norm gave "cosines" of 1e20 on flat image
    regions. Cosines are clamped to [-1, 1]."""
    return _angles(*_centred_gram(x)).to(x.dtype)


def _normalised_distances(d: torch.Tensor) -> torch.Tensor:
    """Distances divided by the mean of the positive ones (left as they are when there is none)."""
    positive = d[d > 0]
    return d / (positive.mean() if positive.numel() else d.new_tensor(1.0)).clamp(min=EPS)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, w_dist: float = 1.0, w_angle: float = 2.0) -> torch.Tensor:
    """Relational KD between two sets of samples [N, ...] (flattened to vectors); the teacher side carries no
    gradient. Each side's Gram matrix is computed once for both terms."""
    s = student.reshape(len(student), -1)
    with torch.no_grad():
        t_gram = _centred_gram(teacher.reshape(len(teacher), -1))
        t_d = _normalised_distances(_distances(t_gram[2]))
        t_a = _angles(*t_gram) if w_angle else None
    s_gram = _centred_gram(s)
    loss = w_dist * F.smooth_l1_loss(_normalised_distances(_distances(s_gram[2])).to(s.dtype), t_d.to(s.dtype))
    if w_angle:
        loss = loss + w_angle * F.smooth_l1_loss(_angles(*s_gram).to(s.dtype), t_a.to(s.dtype))
    return loss


def rows(img: torch.Tensor) -> torch.Tensor:
    """Row strips of one image [C, H, W]: H samples of C*W values (a contiguous copy: the released code's
    ``transpose(...).view`` raises for these)."""
    return img.permute(1, 0, 2).reshape(img.shape[1], -1)


def columns(img: torch.Tensor) -> torch.Tensor:
    """Column strips of one image [C, H, W]: W samples of C*H values."""
    return img.permute(2, 0, 1).reshape(img.shape[2], -1)


def patches(img: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping ``size`` x ``size`` patches of one image [C, H, W] (a border that does not fill a whole
    patch is left out): (H//size)*(W//size) samples of C*size*size values."""
    c, h, w = img.shape
    ph, pw = h // size, w // size
    x = img[:, : ph * size, : pw * size].reshape(c, ph, size, pw, size)
    return x.permute(1, 3, 0, 2, 4).reshape(ph * pw, -1)


def relation_losses(
    student: torch.Tensor, teacher: torch.Tensor, patch_size: int, reduce: str = "mean", patch_mode: str = "image"
) -> dict[str, torch.Tensor]:
    """CRD's three content-relationship losses of a batch [B, C, H, W], each RKD computed per image and
    averaged (``reduce="mean"``) or summed (``"sum"``, the Pix2Pix variant) over the batch.

    ``patch_mode="release_channels"`` reproduces the released Pix2Pix code: RKD over the 3 channels of the
    first B patches of the batch (one patch per "image"), not over the patches of each image.
    """
    out = {"rows": student.new_zeros(()), "cols": student.new_zeros(()), "patch": student.new_zeros(())}
    b = len(student)
    for i in range(b):
        out["rows"] = out["rows"] + rkd_loss(rows(student[i]), rows(teacher[i]))
        out["cols"] = out["cols"] + rkd_loss(columns(student[i]), columns(teacher[i]))
        if patch_mode == "image":
            out["patch"] = out["patch"] + rkd_loss(patches(student[i], patch_size), patches(teacher[i], patch_size))
    if patch_mode == "release_channels":
        c = student.shape[1]
        sp = torch.cat([patches(s, patch_size) for s in student]).reshape(-1, c, patch_size, patch_size)
        tp = torch.cat([patches(t, patch_size) for t in teacher]).reshape(-1, c, patch_size, patch_size)
        for k in range(min(b, len(sp))):
            out["patch"] = out["patch"] + rkd_loss(sp[k], tp[k])
    if reduce == "mean":
        out = {k: v / b for k, v in out.items()}
    return out


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrices [B, C, C] of feature maps [B, C, H, W], normalised by C*H*W."""
    b, c, h, w = f.shape
    x = f.reshape(b, c, h * w)
    return x @ x.transpose(1, 2) / (c * h * w)


class VGGTaps(nn.Module):
    """VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 of images in [-1, 1], remapped to [0, 1] with no
    ImageNet normalisation (CRD / OMGD's convention, which their style weight 1e4 is tuned for)."""

    TAPS = (3, 8, 15, 22)

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features[: self.TAPS[-1] + 1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x + 1.0) / 2.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                out.append(h)
        return out


def style_feature_losses(
    vgg: VGGTaps, student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over taps of L1 between Gram matrices, L1 between relu2_2 features) of student vs teacher."""
    s_f = vgg(student)
    with torch.no_grad():
        t_f = vgg(teacher.detach())
    style = sum(F.l1_loss(gram(s), gram(t)) for s, t in zip(s_f, t_f))
    feature = F.l1_loss(s_f[1], t_f[1])
    return style, feature


def gan_loss(pred: torch.Tensor, real: bool, mode: str, for_discriminator: bool = True) -> torch.Tensor:
    """GAN losses of discriminator outputs: ``lsgan`` (MSE to 1 / 0), ``vanilla`` (BCE with logits) or
    ``hinge`` (D: relu(1 - x) for real, relu(1 + x) for fake; G: -mean(x))."""
    if mode == "lsgan":
        return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred, torch.full_like(pred, 1.0 if real else 0.0))
    if mode == "hinge":
        if not for_discriminator:
            return -pred.mean()
        return F.relu(1.0 - pred).mean() if real else F.relu(1.0 + pred).mean()
    raise ValueError(f"unknown GAN mode {mode!r}")


class ImagePool:
    """CycleGAN's history of generated images (size 50): with probability 1/2 a fake is swapped for a stored
    one. Its contents are method state (checkpointed), its randomness the engine's per-step seeded RNG."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif float(torch.rand(())) > 0.5:
                i = int(torch.randint(0, self.size, ()))
                out.append(self.images[i].to(img.device))
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.cat(out)

    def state(self) -> torch.Tensor | None:
        return torch.cat(self.images).cpu() if self.images else None

    def load(self, stacked: torch.Tensor | None) -> None:
        self.images = [] if stacked is None else [t[None].clone() for t in stacked]
