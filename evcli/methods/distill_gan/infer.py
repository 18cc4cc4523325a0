"""Translating image files with a trained generator (a distill-gan run, checkpoint or exported weights), and
the input | teacher | student grid.

Usable without the CLI::

    from evcli.methods.distill_gan.infer import load_translator, translate
    tr = load_translator("runs/distill-gan/<run>")
    out = translate(tr.generator, rgb)          # RGB [3, H, W] in [0, 1] -> RGB in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evcli.errors import UsageError


@dataclass
class Translator:
    """The generator a weights source holds, and its teacher when one is at hand."""

    generator: nn.Module
    teacher: nn.Module | None
    role: str  # "student" or "teacher"
    weights: str
    recipe: Any


def load_translator(source: str | Path, teacher: str | Path | None = None) -> Translator:
    """A distill-gan run folder, checkpoint or exported weights file, ready to translate (CPU or the
    accelerator the engine picks). ``teacher`` overrides the teacher the run was distilled from."""
    from evcli import api
    from evcli.engine.run import resolve_weights_source
    from evcli.io.checkpoint import read_metadata
    from evcli.recipe import recipe_from_saved

    path = resolve_weights_source(source)
    meta = read_metadata(path, "weights file")
    saved = meta.get("recipe")
    if not isinstance(saved, dict) or saved.get("command") != "distill-gan":
        made = saved.get("command") if isinstance(saved, dict) else None
        raise UsageError(
            f"{path} is not a distill-gan generator" + (f" (made by 'evcli {made}')" if made else " (no evcli recipe)")
        )
    recipe = recipe_from_saved(saved)
    if teacher is not None:
        recipe.method.teacher = str(Path(teacher).expanduser())
    loaded = api.load(path, recipe=recipe)
    method = loaded.method
    role = "student" if method.weights_module == "S" else "teacher"
    g_teacher = None
    if role == "student" and method.teacher_ready and "G_A" in loaded.modules:
        g_teacher = loaded.modules["G_A"].eval()
    return Translator(loaded.model.eval(), g_teacher, role, str(path), recipe)


@torch.no_grad()
def translate(generator: nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    """RGB [3, H, W] in [0, 1] through ``generator`` (reflect-padded to the multiple of its input size it needs: 4
    for the ResNet generators, 2**depth for a U-Net; cropped back)."""
    device = next(generator.parameters()).device
    h, w = rgb.shape[-2:]
    multiple = getattr(generator, "size_multiple", 4)
    ph, pw = (-h) % multiple, (-w) % multiple
    x = rgb[None].to(device) * 2 - 1
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    out = generator(x)[..., :h, :w]
    return ((out[0].float().cpu() + 1) / 2).clamp(0, 1)


def read_image(path: Path) -> torch.Tensor:
    """An image file as RGB [3, H, W] in [0, 1] (DataError when unreadable)."""
    from evcli.io.images import load_rgb

    arr = np.asarray(load_rgb(path), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def grid(*images: torch.Tensor) -> torch.Tensor:
    """Images [3, H, W] side by side with 4 px white gaps."""
    gap = torch.ones(3, images[0].shape[1], 4)
    parts = [x for img in images for x in (img, gap)][:-1]
    return torch.cat(parts, dim=2)
