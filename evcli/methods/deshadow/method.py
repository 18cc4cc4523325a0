"""Engine hooks of ``evcli deshadow``: building LAB-Net / SADC, their losses, the papers' linear lr decay,
SADC's distillation ramp, and the shadow-removal evaluation protocol.

All schedule values (lr factor, distillation coefficient c(e)) are pure functions of the step clock, so
a resumed run continues exactly.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evcli.data.loading import mix_seed
from evcli.engine.method import Frozen, Method, OptimizerSpec, StepOutput
from evcli.metrics.image import lab8_to_rgb, rgb_to_lab8
from evcli.recipe import Recipe


def build_network(cfg: Any) -> nn.Module:
    """The network of a ``deshadow`` config (SADC takes its VGG16 features at call time)."""
    if cfg.method == "detector":
        from evcli.methods.deshadow.detector import ShadowDetector

        return ShadowDetector(cfg.resolved_channels())
    if cfg.method == "labnet":
        from evcli.methods.deshadow.labnet import LABNet

        return LABNet(cfg.resolved_channels(), cfg.eca_laplacian, cfg.lsa_size, cfg.ring_kernel, cfg.lsa_stride)
    from evcli.methods.deshadow.sadc import SADCNet

    return SADCNet(cfg.resolved_channels(), cfg.sadc_morph, cfg.sadc_sparse)


class DeshadowModel(nn.Module):
    """RGB in, RGB out: wraps LAB-Net (LAB conversion around it) or SADC (RGB natively).

    SADC's frozen VGG16 hypercolumn backbone is a frozen module of the run, given as ``features``; it is
    never part of this module's parameters, checkpoints or exports.
    """

    def __init__(self, cfg: Any):
        super().__init__()
        self.method = cfg.method
        self.net = build_network(cfg)

    def forward_raw(self, rgb: torch.Tensor, mask: torch.Tensor, features: nn.Module | None = None) -> torch.Tensor:
        """The network's own output space (LAB-Net: 8-bit LAB / 255; SADC: RGB; detector: shadow logits)."""
        if self.method == "detector":
            return self.net(rgb)
        if self.method == "labnet":
            lab = rgb_to_lab8(rgb)
            weight = self.net.convst.conv.weight
            if weight.is_contiguous(memory_format=torch.channels_last):
                lab = lab.contiguous(memory_format=torch.channels_last)  # see infer.load_remover
            return self.net(lab, mask).to(rgb.dtype)  # bf16 inference: the network casts (infer.load_remover)
        if features is None:
            raise ValueError("SADC needs its VGG16 features (the run's frozen 'vgg' module)")
        return self.net(rgb, mask, features)

    def to_rgb(self, raw: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (the detector: its shadow probability)."""
        if self.method == "detector":
            return torch.sigmoid(raw)
        return lab8_to_rgb(raw) if self.method == "labnet" else raw.clamp(0.0, 1.0)

    def forward(
        self, rgb: torch.Tensor, mask: torch.Tensor, raw: bool = False, features: nn.Module | None = None
    ) -> torch.Tensor:
        """Shadow-free RGB in [0, 1] of RGB images [N, 3, H, W] in [0, 1] and binary masks [N, 1, H, W];
        with ``raw`` the network's own output space (training calls it so, through any DDP wrapper)."""
        out = self.forward_raw(rgb, mask, features)
        return out if raw else self.to_rgb(out)


@torch.no_grad()
def identity_init_labnet(net: nn.Module) -> None:
    """Make a Kaiming-initialised LAB-Net start as the identity map: the last convs of the L and AB blocks
    output zero and the final 3x3 conv passes its input through, so ``final(0 + lab) = lab`` (LAB >= 0 is
    unchanged by the LeakyReLU). Not in the papers: it lets very short trainings (the shipped demo weights)
    start from "no change" instead of a random image."""
    for block in (net.block_l, net.block_ab):
        nn.init.zeros_(block.out.conv.weight)
        nn.init.zeros_(block.out.conv.bias)
    w = net.final.conv.weight
    w.zero_()
    for i in range(3):
        w[i, i, 1, 1] = 1.0
    nn.init.zeros_(net.final.conv.bias)


def needs_vgg(cfg: Any, training: bool) -> bool:
    """SADC always needs VGG16 (its hypercolumn); LAB-Net only for the perceptual loss in training."""
    return cfg.method == "sadc" or (training and cfg.perceptual and cfg.method == "labnet")


class DeshadowMethod(Method):
    """LAB-Net or SADC training and evaluation (modules: the trained ``model``; frozen ``vgg`` for SADC and
    ``perceptual`` for the perceptual loss in training)."""

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.vgg_used = "none (perceptual term off: its pixel-level L1 only)"

    def build_data(self, ctx: Any) -> Any:
        from evcli.data.shadow import build_shadow_data

        return build_shadow_data(self.recipe)

    def build(self, ctx: Any) -> dict[str, nn.Module | Frozen]:
        from evcli.methods.deshadow.layers import init_kaiming, vgg16_features
        from evcli.methods.deshadow.losses import PerceptualLoss

        cfg = self.cfg
        model = DeshadowModel(cfg)
        init_kaiming(model.net)
        if cfg.init == "identity":
            identity_init_labnet(model.net)
        modules: dict[str, nn.Module | Frozen] = {"model": model}
        if cfg.method == "detector":
            self.vgg_used = "none (the detector has no perceptual term)"
            return modules
        vgg = None
        if needs_vgg(cfg, ctx.training):
            vgg, self.vgg_used = vgg16_features(cfg.vgg, cfg.vgg_weights)
            vgg.requires_grad_(False)
            if cfg.method == "sadc":
                modules["vgg"] = Frozen(vgg, self.vgg_used)
        if ctx.training:
            perceptual = PerceptualLoss(vgg if cfg.perceptual else None, cfg.perceptual_features == "post_relu")
            modules["perceptual"] = Frozen(perceptual, self.vgg_used if cfg.perceptual else "none (pixel L1 only)")
        return modules

    def optimizers(self, modules: Any, ctx: Any) -> dict[str, OptimizerSpec]:
        import dataclasses

        params = [p for p in modules.unwrap("model").parameters() if p.requires_grad]
        # the papers' schedule: lr constant until lr_decay_start, then linearly to 0 at the end
        schedule = dataclasses.replace(self.recipe.schedule, sched="linear", decay_start=self.cfg.lr_decay_start)
        return {
            "main": OptimizerSpec(
                [{"params": params, "weight_decay": self.recipe.optim.weight_decay}], schedule=schedule
            )
        }

    def kd_coefficient(self, ctx: Any) -> float:
        from evcli.methods.deshadow.sadc import kd_coefficient

        total_epochs = max(1, -(-ctx.total_steps // ctx.steps_per_epoch))
        start = ctx.resolve(self.cfg.kd_start) // max(ctx.steps_per_epoch, 1)
        return kd_coefficient(ctx.epoch, start, total_epochs)

    @staticmethod
    def _features(modules: Any) -> dict[str, nn.Module]:
        return {"features": modules["vgg"]} if "vgg" in modules else {}

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        from evcli.methods.deshadow.losses import distillation_kl, gradient_loss

        shadow, free = batch["shadow"], batch["free"]
        if self.cfg.method == "detector":
            from evcli.methods.deshadow.detector import balanced_bce

            logits = modules.model(shadow, batch["mask"], raw=True)
            loss = balanced_bce(logits, batch["mask"], self.cfg.detector_pos_weight)
            return StepOutput(loss, {"bce": loss.detach()})
        mask = (batch["mask"] > self.cfg.train_threshold()).to(shadow.dtype)
        if self.cfg.mask_noise > 0:  # the engine reseeds the global RNGs every step: resumes are exact
            from evcli.data.shadow import noisy_masks

            rng = np.random.default_rng(int(np.random.randint(0, 2**31)))
            mask = noisy_masks(mask, shadow, self.cfg.mask_noise, rng)
        raw = modules.model(shadow, mask, raw=True, **self._features(modules))  # through DDP: gradient sync
        target = rgb_to_lab8(free) if self.cfg.method == "labnet" else free
        grad = gradient_loss(raw, target)
        perc = modules.perceptual(raw, target)
        logs: dict[str, torch.Tensor] = {"grad": grad.detach(), "perceptual": perc.detach()}
        if self.cfg.method == "labnet":
            wp, wg, wm = self.cfg.labnet_loss
            mse = nn.functional.mse_loss(raw, target)
            loss = wp * perc + wg * grad + wm * mse
            logs["mse"] = mse.detach()
        else:
            c = self.kd_coefficient(ctx)
            kd = distillation_kl(modules.unwrap("model").net.kd_stats())
            loss = self.cfg.sadc_loss_scale * (perc + grad + c * kd)
            logs["kd"], logs["kd_coef"] = kd.detach(), torch.tensor(c)
        return StepOutput(loss, logs)

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        from evcli.metrics.shadow import ShadowMetrics

        if self.cfg.method == "detector":
            from evcli.methods.deshadow.detector import confusion_sums

            prob = modules.model(batch["shadow"], batch["mask"]).float()
            return {"confusion": confusion_sums(prob, batch["mask"])}
        metrics = ShadowMetrics(self.cfg.eval_resize, device=batch["shadow"].device)
        mask = (batch["mask"] > self.cfg.mask_threshold_test).float()
        pred = modules.model(batch["shadow"], mask, **self._features(modules))
        metrics.update(pred.float(), batch["free"], mask)
        out = {"totals": metrics.totals()}
        if self.cfg.mask_noise > 0:  # the same images under detector-like masks, scored on the true regions
            noisy = ShadowMetrics(self.cfg.eval_resize, device=batch["shadow"].device)
            given = eval_noisy_masks(mask, batch["shadow"], self.recipe.train.seed)
            pred = modules.model(batch["shadow"], given, **self._features(modules))
            noisy.update(pred.float(), batch["free"], mask)
            out["noisy_totals"] = noisy.totals()
        return out

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        if "confusion" in sums:
            from evcli.methods.deshadow.detector import ber_iou

            return ber_iou(sums["confusion"])
        from evcli.metrics.shadow import shadow_summary

        out = shadow_summary(sums["totals"], self.cfg.eval_resize)
        if "noisy_totals" in sums:
            noisy = shadow_summary(sums["noisy_totals"], self.cfg.eval_resize)
            out.update({f"noisy_{k}": v for k, v in noisy.items() if k != "images"})
        return out

    @torch.no_grad()
    def artifacts(self, modules: Any, out_dir: Any, ctx: Any) -> dict[str, str]:
        """shadow | mask | result | ground truth of the first 4 val images (pictures/)."""
        from evcli.io.images import save_png

        val = ctx.engine.val_sets()
        data = next(iter(val.values()))
        folder = Path(out_dir) / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        model = modules.model
        for i in range(min(4, len(data))):
            s = data[(0, i)]
            shadow, free = s["shadow"].to(ctx.device), s["free"]
            mask = (s["mask"] > self.cfg.mask_threshold_test).float().to(ctx.device)
            pred = model(shadow[None], mask[None], **self._features(modules))[0].float().cpu()
            if self.cfg.method == "detector":  # shadow | true mask | probability | detected mask
                pred, free = pred.expand(3, -1, -1), (pred > 0.5).float().expand(3, -1, -1)
            gap = torch.ones(3, shadow.shape[1], 4)
            row = [shadow.cpu(), gap, mask.cpu().expand(3, -1, -1), gap, pred.clamp(0, 1), gap, free]
            save_png(torch.cat([t.float() for t in row], dim=2), folder / f"val_{i}_shadow_mask_result_gt.png")
        return {"pictures": str(folder)}

    def report_extras(self, ctx: Any) -> dict[str, Any]:
        return {"vgg": vgg_description(self.cfg), "eval_resize": self.cfg.eval_resize}


def eval_noisy_masks(masks: torch.Tensor, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Detector-like masks for the val images (:func:`evcli.data.shadow.noisy_mask` on every one), each seeded
    by its image's bytes: the same at every evaluation, whatever the batching or sharding."""
    from evcli.data.shadow import noisy_mask

    out = masks.clone()
    for i in range(masks.shape[0]):
        img = images[i].detach().float().cpu()
        rng = np.random.default_rng(mix_seed(seed, zlib.crc32(img.numpy().tobytes()), 0x401E))
        out[i] = noisy_mask(masks[i].cpu(), img, rng).to(out)
    return out


def vgg_description(cfg: Any) -> str:
    """Which VGG16 a run used (the report states it)."""
    if cfg.method == "detector":
        return "none (the detector has no perceptual term)"
    if cfg.method == "labnet" and not cfg.perceptual:
        return "none (perceptual term off: its pixel-level L1 only)"
    if cfg.vgg == "random":
        return "random VGG16 (fixed seed)"
    return f"ImageNet VGG16 from {cfg.vgg_weights}" if cfg.vgg_weights else "ImageNet VGG16 from torchvision's cache"


def evaluate_baseline(recipe: Recipe, name: str) -> dict[str, Any]:
    """Evaluate a baseline (``identity`` or ``colour_transfer``) on the recipe's val data, with the same
    loop, sharding and metric code as a trained model."""
    from evcli import api
    from evcli.methods.deshadow.baselines import ColourTransfer, Identity

    model = Identity() if name == "identity" else ColourTransfer()
    report = api.evaluate(recipe, None, method=DeshadowMethod(recipe), modules={"model": model})
    report["method"] = name
    return report
