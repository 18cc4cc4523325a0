"""Engine hooks of ``evcli deshadow``: building LAB-Net / SADC, their losses, the papers' linear lr decay,
SADC's distillation ramp, and the shadow-removal evaluation protocol.

All schedule values (lr factor, distillation coefficient c(e)) are pure functions of the step clock, so
a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from evcli.console import log
from evcli.engine.method import Method, StepOutput
from evcli.metrics.image import lab8_to_rgb, rgb_to_lab8
from evcli.recipe import Recipe


def build_network(cfg: Any, vgg_features: nn.Sequential | None = None) -> nn.Module:
    """The network of a ``deshadow`` config (SADC needs the VGG16 features of its hypercolumn)."""
    if cfg.method == "labnet":
        from evcli.methods.deshadow.labnet import LABNet

        return LABNet(cfg.resolved_channels(), cfg.eca_laplacian, cfg.lsa_size, cfg.ring_kernel)
    from evcli.methods.deshadow.sadc import SADCNet

    assert vgg_features is not None
    return SADCNet(vgg_features, cfg.resolved_channels(), cfg.sadc_morph, cfg.sadc_sparse)


class DeshadowModel(nn.Module):
    """RGB in, RGB out: wraps LAB-Net (LAB conversion around it) or SADC (RGB natively).

    The frozen VGG16 of SADC's hypercolumn is held outside the state dict (``_vgg``), so checkpoints and
    exported weights hold only the trained parameters; which VGG was used is recorded in the report.
    """

    def __init__(self, cfg: Any, vgg_features: nn.Sequential | None = None):
        super().__init__()
        self.method = cfg.method
        self._vgg = [vgg_features]  # a list: not registered as a submodule
        self.net = build_network(cfg, vgg_features)
        if cfg.method == "sadc":
            # keep the backbone out of named_parameters/state_dict: drop its registration, keep a reference
            del self.net.hypercolumn._modules["vgg"]
            object.__setattr__(self.net.hypercolumn, "vgg", vgg_features)

    def forward_raw(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network's own output space (LAB-Net: 8-bit LAB / 255; SADC: RGB)."""
        if self.method == "labnet":
            lab = rgb_to_lab8(rgb)
            weight = self.net.convst.conv.weight
            if weight.is_contiguous(memory_format=torch.channels_last):
                lab = lab.contiguous(memory_format=torch.channels_last)  # see infer.load_remover
            return self.net(lab, mask).to(rgb.dtype)  # bf16 inference: the network casts (infer.load_remover)
        vgg = self._vgg[0]
        if vgg is not None and next(vgg.parameters()).device != rgb.device:
            vgg.to(rgb.device)
        return self.net(rgb, mask)

    def to_rgb(self, raw: torch.Tensor) -> torch.Tensor:
        return lab8_to_rgb(raw) if self.method == "labnet" else raw.clamp(0.0, 1.0)

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Shadow-free RGB in [0, 1] of RGB images [N, 3, H, W] in [0, 1] and binary masks [N, 1, H, W];
        with ``raw`` the network's own output space (training calls it so, through any DDP wrapper)."""
        out = self.forward_raw(rgb, mask)
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
    return cfg.method == "sadc" or (training and cfg.perceptual)


def linear_decay(step: int, start: int, total: int) -> float:
    """lr factor of the papers' schedule: 1 until ``start``, then linear to 0 at ``total``."""
    if step < start or total <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / (total - start))


class DeshadowMethod(Method):
    """LAB-Net or SADC training and evaluation."""

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.vgg: nn.Sequential | None = None
        self.vgg_used = "none (perceptual term off: its pixel-level L1 only)"
        self.perceptual: nn.Module | None = None

    def _load_vgg(self) -> nn.Sequential:
        if self.vgg is None:
            from evcli.methods.deshadow.layers import vgg16_features

            self.vgg, self.vgg_used = vgg16_features(self.cfg.vgg, self.cfg.vgg_weights)
            log(f"vgg: {self.vgg_used}")
        return self.vgg

    def build_data(self, ctx: Any) -> Any:
        from evcli.data.shadow import build_shadow_data

        return build_shadow_data(self.recipe)

    def build(self, ctx: Any) -> nn.Module:
        vgg = self._load_vgg() if self.cfg.method == "sadc" else None
        from evcli.methods.deshadow.layers import init_kaiming

        model = DeshadowModel(self.cfg, vgg)
        init_kaiming(model.net)
        if self.cfg.init == "identity":
            identity_init_labnet(model.net)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        # "method": this hook sets the lr itself (constant, then the papers' linear decay)
        return [{"params": params, "weight_decay": self.recipe.optim.weight_decay, "lr_schedule": "method"}]

    def configure_optimizers(self, model: nn.Module, ctx: Any) -> list[torch.optim.Optimizer]:
        from evcli.methods.deshadow.losses import PerceptualLoss

        self.perceptual = PerceptualLoss(self._load_vgg() if self.cfg.perceptual else None).to(ctx.device)
        ctx.extras["vgg"] = self.vgg_used
        return super().configure_optimizers(model, ctx)

    def kd_coefficient(self, ctx: Any) -> float:
        from evcli.methods.deshadow.sadc import kd_coefficient

        total_epochs = max(1, -(-ctx.total_steps // ctx.steps_per_epoch))
        start = ctx.resolve(self.cfg.kd_start) // max(ctx.steps_per_epoch, 1)
        return kd_coefficient(ctx.epoch, start, total_epochs)

    def training_step(self, model: nn.Module, batch: Any, ctx: Any) -> StepOutput:
        from evcli.methods.deshadow.losses import distillation_kl, gradient_loss

        factor = linear_decay(ctx.step, ctx.resolve(self.cfg.lr_decay_start), ctx.total_steps)
        for opt in ctx.optimizers:
            for group in opt.param_groups:
                group["lr"] = ctx.base_lr * factor
        shadow, free = batch["shadow"], batch["free"]
        mask = (batch["mask"] > self.cfg.train_threshold()).to(shadow.dtype)
        core = getattr(model, "module", model)
        raw = model(shadow, mask, raw=True)  # through the wrapper: DDP needs its forward for gradient sync
        target = rgb_to_lab8(free) if self.cfg.method == "labnet" else free
        grad = gradient_loss(raw, target)
        perc = self.perceptual(raw, target)
        logs: dict[str, torch.Tensor] = {"grad": grad.detach(), "perceptual": perc.detach()}
        if self.cfg.method == "labnet":
            wp, wg, wm = self.cfg.labnet_loss
            mse = nn.functional.mse_loss(raw, target)
            loss = wp * perc + wg * grad + wm * mse
            logs["mse"] = mse.detach()
        else:
            c = self.kd_coefficient(ctx)
            kd = distillation_kl(core.net.kd_stats())
            loss = self.cfg.sadc_loss_scale * (perc + grad + c * kd)
            logs["kd"], logs["kd_coef"] = kd.detach(), torch.tensor(c)
        return StepOutput(loss, logs)

    @staticmethod
    def _save_pictures(folder: Path, pictures: list[tuple[torch.Tensor, ...]]) -> None:
        """shadow | mask | result | ground truth of the first val images (overwritten at each evaluation)."""
        from evcli.methods.deshadow.infer import save_png

        folder.mkdir(parents=True, exist_ok=True)
        for i, (shadow, mask, pred, free) in enumerate(pictures):
            gap = torch.ones(3, shadow.shape[1], 4)
            row = [shadow, gap, mask.expand(3, -1, -1), gap, pred.clamp(0, 1), gap, free]
            save_png(torch.cat([t.float().cpu() for t in row], dim=2), folder / f"val_{i}_shadow_mask_result_gt.png")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, ctx: Any) -> dict[str, float]:
        from accelerate.utils import send_to_device

        from evcli.metrics.shadow import ShadowMetrics, shadow_summary

        was_training = model.training
        model.eval()
        acc = ctx.accelerator
        metrics = ShadowMetrics(self.cfg.eval_resize, device=acc.device)
        pictures = []
        for batch in loader:
            batch = send_to_device(batch, acc.device)
            mask = (batch["mask"] > self.cfg.mask_threshold_test).float()
            pred = model(batch["shadow"], mask)
            metrics.update(pred, batch["free"], mask)
            if len(pictures) < 4:
                pictures += [(s, m, p, f) for s, m, p, f in zip(batch["shadow"], mask, pred, batch["free"])]
        if ctx.run_dir is not None and acc.is_main_process:
            self._save_pictures(Path(ctx.run_dir) / "pictures", pictures[:4])
        sums = metrics.totals()
        if acc.num_processes > 1:
            sums = acc.reduce(sums, "sum")
        model.train(was_training)
        return shadow_summary(sums, self.cfg.eval_resize)


def evaluate_baseline(recipe: Recipe, name: str) -> dict[str, Any]:
    """Evaluate a baseline (``identity`` or ``colour_transfer``) on the recipe's val data, with the same
    loader, sharding and metric code as a trained model."""
    from evcli.data.classification import ShardedBatchSampler, make_loader
    from evcli.engine.trainer import TrainContext, make_accelerator
    from evcli.methods.deshadow.baselines import ColourTransfer, Identity

    acc = make_accelerator(recipe)
    ctx = TrainContext(acc, recipe, None)
    method = DeshadowMethod(recipe)
    data = method.build_data(ctx)
    sampler = ShardedBatchSampler(
        len(data.val),
        recipe.data.eval_batch_size or 1,
        acc.process_index,
        acc.num_processes,
        recipe.train.seed,
        train=False,
    )
    loader = make_loader(data.val, sampler, recipe.data.workers, acc.device.type == "cuda")
    model = (Identity() if name == "identity" else ColourTransfer()).to(acc.device)
    return {
        "command": "deshadow",
        "method": name,
        "weights": "none (baseline)",
        "data": data.description,
        "metrics": method.evaluate(model, loader, ctx),
    }
