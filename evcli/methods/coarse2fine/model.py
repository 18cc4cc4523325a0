"""The CF-ViT model: one timm ViT run twice, on a coarse copy of the image and on informative fine patches.

Stage 1 (coarse) embeds the image resized to ``c * p`` px (``c x c`` tokens of the model's own ``p x p`` patch
embedding), runs every block and accumulates the class attention of the blocks from ``attn_from_block`` on,
``G <- beta * G + (1 - beta) * A_l``. Stage 2 (fine) embeds the full image (``2c x 2c`` tokens), adds the reused
coarse features (final norm -> LayerNorm + MLP -> nearest 2x upsampling) and the fine position embedding, keeps
the 4 fine children of the ``ceil(alpha * c^2)`` coarse patches with the highest class attention and the coarse
*input* embeddings of the rest: ``1 + 4K + (c^2 - K)`` tokens (125 for c = 7, 205 for c = 9), then runs the same
blocks, norm and head. Everything is shared between the stages except the two position embeddings.

The fine grid is always ``2c`` and the fine image ``2c * p``, for every ``c`` (the released DeiT early-exit
code hard-codes 14 x 14 / 224 px and is wrong for c = 9; this module has no such constant).

Parameter names follow timm's VisionTransformer (``cls_token``, ``pos_embed`` = the fine one, ``patch_embed``,
``blocks``, ``norm``, ``head``) plus ``pos_embed_coarse`` and ``reuse.*``, so a plain ViT's weights map by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evcli.errors import UsageError


class ReuseBlock(nn.Module):
    """Feature reuse: LayerNorm then an MLP d -> 4d -> d with GELU, applied to the coarse final patch tokens."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init (its reuse block is built before the model's ViT weight init runs): linear
        weights truncated normal, std 0.02, zero biases; LayerNorm weight 1, bias 0 (PyTorch's default init would
        give fc1 about three times that spread)."""
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def check_plain_vit(vit: nn.Module, name: str) -> None:
    """Refuse a timm model CF-ViT cannot run: it needs a VisionTransformer with one class token, absolute position
    embeddings and plain pre-norm blocks (DeiT / ViT; not distilled, register-token, pooled or hybrid ones)."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    why = None
    if not isinstance(vit, VisionTransformer) or type(vit).__name__ != "VisionTransformer":
        why = "it is not a timm VisionTransformer"
    elif not vit.has_class_token or vit.num_reg_tokens or vit.num_prefix_tokens != 1:
        why = "CF-ViT needs exactly one class token (no register or distillation tokens)"
    elif vit.global_pool != "token":
        why = f"CF-ViT classifies from the class token; this model pools '{vit.global_pool}'"
    elif vit.pos_embed is None or vit.no_embed_class:
        why = "CF-ViT needs absolute position embeddings that include the class token"
    elif not isinstance(vit.patch_embed.proj, nn.Conv2d) or getattr(vit.patch_embed, "backbone", None) is not None:
        why = "CF-ViT needs a plain patch-embedding convolution (not a hybrid backbone)"
    else:
        for blk in vit.blocks:
            if type(blk) is not Block or type(blk.attn) is not Attention or blk.attn.gate is not None:
                why = f"CF-ViT runs timm's plain pre-norm Block with Attention; this model has {type(blk).__name__}"
                break
    if why:
        raise UsageError(
            f"model '{name}' cannot be a CF-ViT: {why}",
            hint="use a DeiT / ViT with a class token: deit_tiny_patch16_224, deit_small_patch16_224, "
            "deit_base_patch16_224, vit_small_patch16_224 ...",
        )


def child_index(coarse_grid: int) -> torch.Tensor:
    """``(c^2, 4)``: the fine-token indices (on the ``2c x 2c`` grid, row-major) of each coarse token's 2x2
    children: ``2i*2c + 2j``, ``+1``, ``+2c``, ``+2c+1`` for coarse token ``(i, j)``."""
    c = coarse_grid
    i, j = torch.meshgrid(torch.arange(c), torch.arange(c), indexing="ij")
    top_left = (2 * i * 2 * c + 2 * j).reshape(-1)
    return torch.stack([top_left, top_left + 1, top_left + 2 * c, top_left + 2 * c + 1], dim=1)


def num_informative(coarse_grid: int, alpha: float) -> int:
    """K = ceil(alpha * c^2) (25 for c = 7, 41 for c = 9 at alpha = 0.5)."""
    return int(math.ceil(alpha * coarse_grid * coarse_grid - 1e-9))


def fine_tokens(coarse_grid: int, alpha: float, informative: bool = True) -> int:
    """Tokens of the fine stage: 1 + 4K + (c^2 - K) with informative selection, else 1 + (2c)^2."""
    c = coarse_grid
    if not informative:
        return 1 + 4 * c * c
    k = num_informative(c, alpha)
    return 1 + 4 * k + (c * c - k)


def block_with_class_attention(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One timm pre-norm block, returning its output and the class token's attention row ``(B, heads, N)``.

    The block output is computed exactly as timm's ``Block.forward`` (fused attention); the class row of the
    softmax attention ``softmax(q_cls k^T * scale)`` is computed on the side (N * d MACs instead of N^2 * d), which
    is all the global class attention needs.
    """
    attn = blk.attn
    h = blk.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    cls_row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
    out = out.transpose(1, 2).reshape(b, n, attn.attn_dim)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    x = x + blk.drop_path1(blk.ls1(out))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, cls_row


class CFViT(nn.Module):
    """A two-stage coarse-to-fine ViT over the modules of a timm VisionTransformer (shared by both stages).

    Args:
        vit: a timm VisionTransformer built for the *fine* input (``2c * p`` px); its modules are taken over.
        coarse_grid: ``c``; the model's token grid must be ``2c x 2c``.
        alpha: informative fraction (K = ceil(alpha c^2)).
        beta: EMA factor of the global class attention over blocks.
        attn_from_block: first block whose attention enters the global class attention.
        threshold: eta of the default ``forward`` (early exit when max softmax >= eta; 1 = always fine).
    """

    def __init__(
        self,
        vit: nn.Module,
        coarse_grid: int,
        alpha: float = 0.5,
        beta: float = 0.99,
        attn_from_block: int = 3,
        threshold: float = 1.0,
        name: str = "vit",
    ):
        super().__init__()
        from timm.layers import resample_abs_pos_embed

        check_plain_vit(vit, name)
        grid = tuple(vit.patch_embed.grid_size)
        patch = vit.patch_embed.patch_size[0]
        if grid != (2 * coarse_grid, 2 * coarse_grid):
            raise UsageError(
                f"coarse grid {coarse_grid} needs a {2 * coarse_grid}x{2 * coarse_grid} fine token grid "
                f"({2 * coarse_grid * patch} px with {patch} px patches); the model has {grid[0]}x{grid[1]}",
                hint=f"use --img-size {2 * coarse_grid * patch}, or another --coarse-grid",
            )
        if not 0 <= attn_from_block < len(vit.blocks):
            raise UsageError(
                f"coarse2fine.attn_from_block {attn_from_block} is not a block of this {len(vit.blocks)}-block model",
                hint=f"use a value from 0 to {len(vit.blocks) - 1}",
            )
        self.coarse_grid, self.patch = coarse_grid, patch
        self.alpha, self.beta, self.attn_from_block = alpha, beta, attn_from_block
        self.threshold = threshold
        self.num_informative = num_informative(coarse_grid, alpha)
        self.embed_dim = vit.embed_dim
        self.num_classes = vit.num_classes
        self.num_prefix_tokens = 1
        self.coarse_size, self.fine_size = coarse_grid * patch, 2 * coarse_grid * patch
        # shared by both stages (timm's names)
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed  # the fine stage's
        self.pos_drop, self.norm_pre = vit.pos_drop, vit.norm_pre
        self.blocks, self.norm = vit.blocks, vit.norm
        self.fc_norm, self.head_drop, self.head = vit.fc_norm, vit.head_drop, vit.head
        # CF-ViT's own: the coarse stage's position embedding and the feature-reuse block
        with torch.no_grad():
            coarse_pos = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[coarse_grid] * 2, num_prefix_tokens=1)
        self.pos_embed_coarse = nn.Parameter(coarse_pos.clone())
        self.reuse = ReuseBlock(vit.embed_dim)
        self.register_buffer("children_index", child_index(coarse_grid), persistent=False)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "pos_embed_coarse", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    # --- the two stages -------------------------------------------------------------------------

    def coarse_input(self, x: torch.Tensor) -> torch.Tensor:
        """The coarse copy of a fine batch: bilinear, align_corners=True (as the paper trains and evaluates)."""
        size = (self.coarse_size, self.coarse_size)
        return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def _patches(self, img: torch.Tensor) -> torch.Tensor:
        return self.patch_embed.norm(self.patch_embed.proj(img).flatten(2).transpose(1, 2))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.fc_norm(x[:, 0])))

    def coarse(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1 on the coarse image: (logits, final normed tokens, class attention ``(B, c^2)``, the coarse
        input embeddings ``E(x_c) + P_c`` with the class token)."""
        b = xc.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self._patches(xc)], dim=1) + self.pos_embed_coarse
        embedded = x
        x = self.norm_pre(self.pos_drop(x))
        g = None
        for i, blk in enumerate(self.blocks):
            if i < self.attn_from_block:
                x = blk(x)
                continue
            x, row = block_with_class_attention(blk, x)
            g = (1.0 - self.beta) * row if g is None else self.beta * g + (1.0 - self.beta) * row
        x = self.norm(x)
        cls_attn = g[:, :, 1:].mean(dim=1)
        return self._head(x), x, cls_attn, embedded

    def fine_sequence(
        self,
        xf: torch.Tensor,
        coarse_final: torch.Tensor,
        cls_attn: torch.Tensor,
        coarse_embedded: torch.Tensor,
        informative: bool,
    ) -> torch.Tensor:
        """The fine stage's input tokens (see the module docstring)."""
        b, c, d = xf.shape[0], self.coarse_grid, self.embed_dim
        reused = self.reuse(coarse_final[:, 1:]).transpose(1, 2).reshape(b, d, c, c)
        reused = F.interpolate(reused, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)
        tokens = self._patches(xf) + reused + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        if not informative:
            return torch.cat([cls, tokens], dim=1)
        order = cls_attn.argsort(dim=1, descending=True, stable=True)
        top, rest = order[:, : self.num_informative], order[:, self.num_informative :]
        fine_idx = self.children_index[top].reshape(b, -1)
        chosen = tokens.gather(1, fine_idx.unsqueeze(-1).expand(-1, -1, d))
        kept = coarse_embedded[:, 1:].gather(1, rest.unsqueeze(-1).expand(-1, -1, d))
        return torch.cat([cls, chosen, kept], dim=1)

    def fine(
        self,
        xf: torch.Tensor,
        coarse_final: torch.Tensor,
        cls_attn: torch.Tensor,
        coarse_embedded: torch.Tensor,
        informative: bool = True,
    ) -> torch.Tensor:
        """Stage 2: logits of the fine stage."""
        x = self.fine_sequence(xf, coarse_final, cls_attn, coarse_embedded, informative)
        x = self.norm_pre(self.pos_drop(x))
        x = self.blocks(x)
        return self._head(self.norm(x))

    def both(self, x: torch.Tensor, informative: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse and fine logits of every image (training; the evaluation sweep)."""
        logits_c, final, cls_attn, embedded = self.coarse(self.coarse_input(x))
        return logits_c, self.fine(x, final, cls_attn, embedded, informative)

    def early_exit(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference with early exit: logits, and which images went on to the fine stage.

        Images whose coarse max-softmax is >= ``threshold`` exit; the fine stage runs on the rest of the batch
        only. ``threshold >= 1`` sends every image to the fine stage (the paper's eta = 1)."""
        logits_c, final, cls_attn, embedded = self.coarse(self.coarse_input(x))
        if threshold >= 1.0:
            go_on = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            go_on = logits_c.float().softmax(dim=-1).amax(dim=-1) < threshold
        idx = go_on.nonzero().squeeze(1)
        if idx.numel() == 0:
            return logits_c, go_on
        if idx.numel() == x.shape[0]:
            return self.fine(x, final, cls_attn, embedded, True), go_on
        out = logits_c.clone()
        out[idx] = self.fine(x[idx], final[idx], cls_attn[idx], embedded[idx], True).to(out.dtype)
        return out, go_on

    def forward(
        self, x: torch.Tensor, mode: str = "exit", informative: bool = True, threshold: float | None = None
    ) -> Any:
        """``mode="exit"``: logits with early exit at ``threshold`` (default: the model's); ``"both"``: the
        (coarse, fine) logits of every image."""
        if mode == "both":
            return self.both(x, informative)
        return self.early_exit(x, self.threshold if threshold is None else threshold)[0]


def stage_macs(model: CFViT) -> dict[str, int]:
    """MACs of one image through each stage, counted by :mod:`evcli.ops.flops` (never a stored list):
    ``coarse`` (coarse stage incl. its head), ``fine`` (reuse block, fine embedding, the fine stage on
    1 + 4K + (c^2 - K) tokens), and ``total`` = coarse + fine (an image that does not exit)."""
    from evcli.ops.flops import counting

    device = model.pos_embed.device
    was = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, model.fine_size, model.fine_size, device=device)
        with torch.no_grad():
            xc = model.coarse_input(x)
        with counting(model) as c1:
            _, final, cls_attn, embedded = model.coarse(xc)
        with counting(model) as c2:
            model.fine(x, final, cls_attn, embedded, True)
    finally:
        model.train(was)
    return {"coarse": c1.total, "fine": c2.total, "total": c1.total + c2.total}
