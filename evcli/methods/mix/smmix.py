"""SMMix (arXiv 2212.12977): self-motivated image mixing for ViTs.

Per SMMix step (the other half of the steps take plain Mixup):

1. the model under training, in eval mode, without gradients and outside autocast, scores every
   patch by the patch-to-patch attention of its last self-attention layer, averaged over heads and
   over patch queries (the attention each patch *receives*);
2. one square side r per batch, uniform in [int(0.25 s), int(0.75 s)] for an s x s token grid;
3. per image, the r x r window with the least summed attention and, in the partner image
   (b' = B-1-b), the window with the most;
4. the partner's most-attended window is pasted, patch-aligned, over the image's least-attended one;
5. lambda = (s^2 - r^2) / s^2, labels mixed by area with label smoothing;
6. losses: soft-target CE of the class token, the token head on the mean final patch tokens of each
   region supervised with that region's own label ("fine-grained label assignment"), and
   KL(softmax(lambda z_b + (1 - lambda) z_b') || softmax(z_mixed)) with the clean logits of step 1
   ("feature consistency").

:class:`TokenGridAdapter` finds the attention and the token grid of timm ViT/DeiT, CaiT and PVT v2
models, so that side and patch size come from the model, not from flags.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evcli.errors import UsageError

SUPPORTED = "timm VisionTransformer / DeiT (vit_*, deit_*), CaiT (cait_*) and PVT v2 (pvt_v2_*)"


@dataclass
class TokenGridAdapter:
    """How to read one timm model family: where its attention is, and its final patch-token grid.

    Attributes:
        kind: ``vit``, ``cait`` or ``pvt_v2``.
        attention: the attention module whose softmaxed map is captured (its ``attn_drop`` input).
        attn_prefix: non-patch tokens at the start of the captured map's query/key axes.
        feature_prefix: non-patch tokens at the start of ``forward_features`` output (token models).
        stride: input pixels per final grid cell along each side (the patch size of the mixing grid).
    """

    kind: str
    attention: nn.Module
    attn_prefix: int
    feature_prefix: int
    stride: int

    @classmethod
    def for_model(cls, model: nn.Module, name: str = "") -> TokenGridAdapter:
        """Adapter for a timm model, or a UsageError saying what the model lacks."""
        from timm.models.cait import Cait
        from timm.models.pvt_v2 import PyramidVisionTransformerV2
        from timm.models.vision_transformer import VisionTransformer

        label = name or type(model).__name__
        if isinstance(model, Cait):
            # CaiT's self-attention blocks see patch tokens only; the class token joins in blocks_token_only.
            return cls("cait", model.blocks[-1].attn, 0, model.num_prefix_tokens, _patch(model))
        if isinstance(model, VisionTransformer):
            if getattr(model, "global_pool", "token") not in ("token", "avg", "") and not model.num_prefix_tokens:
                raise UsageError(f"--method smmix: model '{label}' pools its tokens with '{model.global_pool}'")
            attn = model.blocks[-1].attn
            if not hasattr(attn, "attn_drop"):
                raise UsageError(f"--method smmix: model '{label}' has no readable attention map in its last block")
            return cls("vit", attn, model.num_prefix_tokens, model.num_prefix_tokens, _patch(model))
        if isinstance(model, PyramidVisionTransformerV2):
            attn = model.stages[-1].blocks[-1].attn
            stride = 4 * 2 ** (len(model.stages) - 1)  # 4x4 stem, then a 2x2 downsampling per later stage
            return cls("pvt_v2", attn, 0, 0, stride)
        raise UsageError(
            f"--method smmix needs a vision transformer with self-attention over a uniform patch-token grid; "
            f"model '{label}' ({type(model).__name__}) has none",
            hint=f"supported: {SUPPORTED}; use --method cutmix or mixup for other models",
        )

    def grid_side(self, img_size: int) -> int:
        """Side s of the final token grid for square inputs of ``img_size`` pixels."""
        if img_size % self.stride:
            raise UsageError(
                f"--method smmix: image size {img_size} is not divisible by the model's patch size {self.stride}",
                hint=f"use --img-size {max(self.stride, img_size // self.stride * self.stride)}",
            )
        return img_size // self.stride

    @contextmanager
    def capture(self) -> Any:
        """Inside the block, the captured attention map lands in the yielded list (unfused attention)."""
        maps: list[torch.Tensor] = []
        fused = getattr(self.attention, "fused_attn", None)
        if fused is not None:
            self.attention.fused_attn = False  # the fused kernel returns no attention map
        if self.kind == "cait":
            # talking-heads attention: the per-head softmax maps enter proj_w as [B, N, N, heads]; after proj_w
            # they are mixed across heads (and no longer distributions), so read them before it
            handle = self.attention.proj_w.register_forward_pre_hook(
                lambda m, args: maps.append(args[0].permute(0, 3, 1, 2).detach())
            )
        else:
            handle = self.attention.attn_drop.register_forward_hook(
                lambda m, args, out: maps.append(args[0].detach())
            )
        try:
            yield maps
        finally:
            handle.remove()
            if fused is not None:
                self.attention.fused_attn = fused

    def patch_scores(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, heads, N, N] attention -> [B, s^2]: attention received by each patch from patch queries."""
        p = self.attn_prefix
        return attn[:, :, p:, p:].float().mean(dim=(1, 2))

    def patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output -> final normalised patch tokens [B, s^2, C]."""
        if self.kind == "pvt_v2":
            return features.flatten(2).transpose(1, 2)
        return features[:, self.feature_prefix :]


def _patch(model: nn.Module) -> int:
    ps = model.patch_embed.patch_size
    ps = ps if isinstance(ps, (tuple, list)) else (ps, ps)
    if ps[0] != ps[1]:
        raise UsageError(f"--method smmix needs square patches, the model has {tuple(ps)}")
    return int(ps[0])


class SMMixModel(nn.Module):
    """A timm backbone plus SMMix's train-time token head (dropped at export).

    ``forward(x)`` returns class logits; ``forward(x, target_mask, source_mask)`` also returns the
    token-head logits of the mean final patch tokens under each mask.
    """

    def __init__(self, backbone: nn.Module, adapter: TokenGridAdapter, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.token_head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.token_head.weight, std=0.02)  # the reference's ViT head init
        nn.init.zeros_(self.token_head.bias)

    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay parameters (position embeddings, class token), under their names here: SMMix
        runs decay exactly what the none / Mixup / CutMix runs they are compared with decay."""
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}

    def forward(
        self, x: torch.Tensor, target_mask: torch.Tensor | None = None, source_mask: torch.Tensor | None = None
    ) -> Any:
        features = self.backbone.forward_features(x)
        logits = self.backbone.forward_head(features)
        if target_mask is None:
            return logits
        tokens = self.adapter.patch_tokens(features)
        return (
            logits,
            self.token_head(_masked_mean(tokens, target_mask)),
            self.token_head(_masked_mean(tokens, source_mask)),
        )


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1)  # every mask holds >= 1 token: 1 <= r < s


def side_range(s: int, min_ratio: float, max_ratio: float) -> list[int]:
    """The region sides r drawn from: ``range(int(s*min), int(s*max)+1)``, kept within 1..s-1."""
    lo, hi = max(1, int(s * min_ratio)), min(s - 1, int(s * max_ratio))
    if lo > hi:
        raise UsageError(
            f"--method smmix: a {s}x{s} token grid is too small for regions of {min_ratio}-{max_ratio} of its side",
            hint="use a larger --img-size or a smaller patch size",
        )
    return list(range(lo, hi + 1))


def window_search(scores: torch.Tensor, s: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left token (row, col) of each image's least- and most-attended r x r window.

    Args:
        scores: [B, s^2] per-patch attention scores.
    Returns:
        (min_window, max_window), each [B] window ids over the (s-r+1)^2 stride-1 windows, row-major.
    """
    sums = F.avg_pool2d(scores.view(-1, 1, s, s), kernel_size=r, stride=1).flatten(1)
    return sums.argmin(dim=1), sums.argmax(dim=1)


def window_tokens(window: torch.Tensor, s: int, r: int) -> torch.Tensor:
    """[B] window ids -> [B, r^2] token indices of each window, row-major inside the window."""
    n = s - r + 1
    row, col = window // n, window % n
    offs = torch.arange(r, device=window.device)
    rows = (row[:, None] + offs[None, :])[:, :, None]
    cols = (col[:, None] + offs[None, :])[:, None, :]
    return (rows * s + cols).flatten(1)


@dataclass
class SMMixBatch:
    """A mixed batch with everything the loss and the picture need."""

    images: torch.Tensor  # [B, 3, H, W] mixed
    lam: float  # area of its own image each mixed image keeps
    side: int  # r
    grid: int  # s
    source_mask: torch.Tensor  # [B, s^2] bool: pasted tokens (from the partner)
    target_mask: torch.Tensor  # [B, s^2] bool: the image's own tokens
    dst_tokens: torch.Tensor  # [B, r^2] where the paste went (least-attended window of b)
    src_tokens: torch.Tensor  # [B, r^2] where in the partner it came from (most-attended window of b')


def smmix_images(images: torch.Tensor, scores: torch.Tensor, s: int, r: int) -> SMMixBatch:
    """Paste each partner's most-attended r x r window over each image's least-attended one.

    Args:
        images: [B, 3, H, W] clean batch, H = W = s * patch.
        scores: [B, s^2] attention received per patch.
    """
    b, _, h, w = images.shape
    p = h // s
    win_min, win_max = window_search(scores, s, r)
    dst = window_tokens(win_min, s, r)  # [B, r^2]
    partner = torch.arange(b - 1, -1, -1, device=images.device)
    src = window_tokens(win_max, s, r)[partner]  # partner's most-attended window
    patches = F.unfold(images, kernel_size=p, stride=p)  # [B, 3*p*p, s^2]
    mixed = patches.clone()
    rows = torch.arange(b, device=images.device)[:, None]
    mixed[rows, :, dst] = patches[partner[:, None], :, src]
    out = F.fold(mixed, output_size=(h, w), kernel_size=p, stride=p)
    source_mask = torch.zeros(b, s * s, dtype=torch.bool, device=images.device)
    source_mask[rows, dst] = True
    return SMMixBatch(out, (s * s - r * r) / (s * s), r, s, source_mask, ~source_mask, dst, src)


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing (timm's convention: off = eps / C)."""
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, batch mean."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def consistency_kl(mixed_logits: torch.Tensor, clean_logits: torch.Tensor, lam: float) -> torch.Tensor:
    """KL(softmax(lam z_b + (1-lam) z_b') || softmax(z_mixed)), batch mean; logits are mixed, not probs."""
    target_logits = lam * clean_logits + (1.0 - lam) * clean_logits.flip(0)
    target = F.softmax(target_logits.float(), dim=-1)
    return F.kl_div(F.log_softmax(mixed_logits.float(), dim=-1), target, reduction="batchmean")


def save_mixed_grid(
    path: Path,
    clean: torch.Tensor,
    mixed: SMMixBatch,
    labels: torch.Tensor,
    n: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: list[str],
) -> Path:
    """PNG: per image, a column of [image, partner, mixed]; red = least-attended window (pasted over),
    green = the partner's most-attended window (pasted from); captions give labels and lambda."""
    from PIL import Image, ImageDraw

    b, _, h, _ = clean.shape
    cell = max(96, h)
    scale = cell / h
    p = h // mixed.grid
    m = torch.tensor(mean, device=clean.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=clean.device).view(1, 3, 1, 1)

    def to_pil(x: torch.Tensor) -> Image.Image:
        arr = ((x * sd + m).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy() * 255).astype("uint8")
        return Image.fromarray(arr).resize((cell, cell), Image.NEAREST)

    def box(draw: Any, token: int, color: str) -> None:
        r0, c0 = divmod(int(token), mixed.grid)
        x0, y0 = c0 * p * scale, r0 * p * scale
        size = mixed.side * p * scale
        draw.rectangle([x0, y0, x0 + size - 1, y0 + size - 1], outline=color, width=2)

    pad, text_h = 4, 28
    sheet = Image.new("RGB", (n * (cell + pad) + pad, 3 * (cell + pad) + text_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        j = b - 1 - i
        x = pad + i * (cell + pad)
        panels = [
            (clean[i : i + 1], mixed.dst_tokens[i, 0], "red"),
            (clean[j : j + 1], mixed.src_tokens[i, 0], "green"),
            (mixed.images[i : i + 1], mixed.dst_tokens[i, 0], "red"),
        ]
        for row, (img, token, color) in enumerate(panels):
            tile = to_pil(img)
            box(ImageDraw.Draw(tile), token, color)
            sheet.paste(tile, (x, pad + row * (cell + pad)))
        yi, yj = int(labels[i]), int(labels[j])
        name = lambda k: class_names[k] if k < len(class_names) else str(k)  # noqa: E731
        draw.text(
            (x, 3 * (cell + pad) + 2), f"{name(yi)} <- {name(yj)}\nlam={mixed.lam:.2f} r={mixed.side}", fill="black"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
