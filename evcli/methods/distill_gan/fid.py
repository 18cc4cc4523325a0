"""FID of generated images with InceptionV3 pool features, from a weights file the user provides.

The network is torchvision's InceptionV3 (its ``Inception3`` module and key names, e.g. the state dict of
``inception_v3(weights=IMAGENET1K_V1)`` saved as .safetensors; ``AuxLogits.*`` and ``fc.*`` are ignored), fed
images in [-1, 1] resized to 299x299 bilinearly, read at the 2048-d average pool. This is not pytorch-fid's
"FID Inception" port that GAN-compression papers use (different weights and resize), so its numbers are not
comparable with the papers' FIDs; the report says which network it used. Without a weights file no number
called FID is computed.

Statistics are sums (count, feature sums, sums of outer products) so the engine adds them over batches and
processes; :func:`frechet_distance` turns the two sets of moments into the distance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evcli.errors import CheckpointError

FEATURES = 2048


class InceptionPool(nn.Module):
    """InceptionV3 up to its 2048-d average pool."""

    def __init__(self, weights: str | Path):
        super().__init__()
        from torchvision.models import inception_v3

        from evcli.io.checkpoint import read_safetensors

        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        net.fc = nn.Identity()
        tensors, _ = read_safetensors(weights, "Inception weights file")
        state = {k: v for k, v in tensors.items() if not k.startswith(("AuxLogits.", "fc."))}
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            raise CheckpointError(
                f"{weights} does not hold torchvision InceptionV3 weights "
                f"({len(missing)} missing, {len(wrong)} mis-shaped keys, e.g. {(missing + wrong)[0]})"
            )
        net.load_state_dict(state, strict=False)
        self.net = net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool features [N, 2048] of images [N, 3, H, W] in [-1, 1]."""
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)


def moments(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summable moments of features [N, D]: count, sum, sum of outer products (float64)."""
    f = features.double()
    return {"n": torch.tensor(float(len(f)), dtype=torch.float64, device=f.device), "sum": f.sum(0), "outer": f.T @ f}


def frechet_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) from summed moments (unbiased covariances)."""
    from scipy import linalg

    stats = []
    for m in (a, b):
        n = float(m["n"])
        if n < 2:
            return float("nan")
        mu = (m["sum"] / n).cpu().numpy()
        cov = ((m["outer"] - n * torch.outer(m["sum"] / n, m["sum"] / n)) / (n - 1)).cpu().numpy()
        stats.append((mu, cov))
    (mu1, s1), (mu2, s2) = stats
    import warnings

    with warnings.catch_warnings():  # a near-singular product (few images) is handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # the usual regularisation of near-singular products (pytorch-fid's)
            eps = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
