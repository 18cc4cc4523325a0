"""Engine hooks of ``evcli distill-gan``: teacher training (CycleGAN / Pix2Pix), CRD student distillation with the
online teacher discriminator, the card's schedules, and the student-vs-teacher evaluation.

Modules (names are the checkpoint's): ``G_A`` (the teacher's A->B generator), ``G_B``, ``D_A`` (judges B-domain
images, as in the CycleGAN code), ``D_B`` (CycleGAN only), ``S`` (the student), ``vgg`` (frozen VGG16 taps).

* ``stage: teacher``: trains G_A, D_A (+ G_B, D_B); exports G_A.
* ``stage: student`` with ``teacher: FILE``: the teacher is done: G_A and D_A are frozen modules from the file
  (never in the student's checkpoint); every step is a student step; exports S.
* ``stage: student`` without a teacher file: the card's online algorithm. CycleGAN: ``teacher_phase`` of teacher
  training, then ``n_dis`` x ``teacher_phase`` of student training against the teacher as it is at that point
  (its G_A, and its current D_A frozen as the adversary), repeated; learning rates follow the teacher's epochs.
  Pix2Pix: every step updates D, then (every ``n_dis`` steps) G, then the student on the teacher's output.

All schedule values are pure functions of the step clock; the image pools are method state, so resume is exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evcli.engine.method import Frozen, Method, OptimizerSpec, StepOutput
from evcli.errors import CheckpointError
from evcli.recipe import Recipe


def make_generator(arch: str, width: int, n_blocks: int, dropout: float = 0.0) -> nn.Module:
    """A generator from its (architecture, width, residual blocks or U-Net depth) triple (``describe_generator``'s);
    ``dropout`` applies to the U-Net's deep decoder levels only."""
    from evcli.methods.distill_gan.networks import ResnetGenerator, UnetGenerator

    if arch == "unet":
        return UnetGenerator(width, n_blocks, dropout=dropout)
    return ResnetGenerator(width, arch, n_blocks)


def recipe_generator(cfg: Any, role: str, img_size: int) -> nn.Module:
    """The recipe's teacher or student generator (a U-Net's depth follows ``img_size`` unless set)."""
    return make_generator(*cfg.generator_spec(role, img_size), dropout=cfg.unet_dropout)


def disc_in_channels(task: str) -> int:
    """The PatchGAN's input channels: an image (CycleGAN) or the source + output pair (Pix2Pix)."""
    return 3 if task == "cyclegan" else 6


def make_discriminator(task: str, ndf: int, norm: str = "instance") -> nn.Module:
    from evcli.methods.distill_gan.networks import NLayerDiscriminator

    return NLayerDiscriminator(in_ch=disc_in_channels(task), ndf=ndf, norm=norm)


def judge_real_fake(
    modules: Any, name: str, real: torch.Tensor, fake: torch.Tensor, batch_norm: bool, fake_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained discriminator's predictions on the real and the fake batch.

    InstanceNorm works per image: one call on both batches concatenated (through the module's DDP wrapper).
    BatchNorm would mix real and fake statistics: two calls, as in the Pix2Pix / CycleGAN code, the first through
    the wrapper and the second on the module itself; ``fake_first`` is the Pix2Pix release's order (the CycleGAN
    code judges the real batch first), which decides the last update of the running statistics.
    """
    if not batch_norm:
        pred = modules[name](torch.cat([real, fake]))
        return pred[: len(real)], pred[len(real) :]
    if fake_first:
        pred_fake = modules[name](fake)
        return modules.unwrap(name)(real), pred_fake
    pred_real = modules[name](real)
    return pred_real, modules.unwrap(name)(fake)


# --------------------------------------------------------------------------------------------------
# a trained teacher from a file


def teacher_file(source: str | Path) -> Path:
    """The file a ``teacher`` source stands for: a run folder's last training checkpoint (it holds the teacher's
    discriminator too), else its final weights; a file as given."""
    p = Path(source).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.safetensors", p / "final.safetensors", p / "teacher.safetensors"):
            if candidate.exists():
                return candidate
        raise CheckpointError(f"no teacher weights in {p} (no checkpoints/last.safetensors or final.safetensors)")
    if not p.exists():
        raise CheckpointError(f"teacher file not found: {p}")
    return p


def load_teacher(source: str | Path, cfg: Any, need_d: bool, img_size: int) -> tuple[nn.Module, nn.Module | None, str]:
    """The teacher's G_A (and D_A when ``need_d``) from a teacher run, checkpoint or weights file, checked
    against the recipe's teacher architecture, width and blocks / U-Net depth at ``img_size`` and its
    discriminator norm (a mismatch is named)."""
    from evcli.io.checkpoint import load_model_weights, read_safetensors
    from evcli.methods.distill_gan.networks import describe_generator, discriminator_norm

    path = teacher_file(source)
    tensors, meta = read_safetensors(path, "teacher file")
    saved = meta.get("recipe") or {}
    if saved and saved.get("command") != "distill-gan":
        raise CheckpointError(f"{path} holds weights of 'evcli {saved.get('command')}', not a distill-gan teacher")
    if meta.get("kind") == "training":
        if saved.get("distill-gan", {}).get("stage") == "student" and "G_A" not in (meta.get("modules") or []):
            raise CheckpointError(f"{path} is a student checkpoint (its teacher was a file): pass the teacher itself")
        g_state = {k[len("module.G_A.") :]: v for k, v in tensors.items() if k.startswith("module.G_A.")}
        d_state = {k[len("module.D_A.") :]: v for k, v in tensors.items() if k.startswith("module.D_A.")}
    else:
        g_state, d_state = dict(tensors), {}
    found = describe_generator(g_state)
    if found is None:
        raise CheckpointError(f"{path} holds no generator weights (no 3->width 7x7 or U-Net 4x4 first convolution)")
    arch, width, blocks = found
    wanted = cfg.generator_spec("teacher", img_size)
    if (arch, width, blocks) != wanted:
        names = {"mobile_resnet": "mobile ResNet", "resnet": "ResNet", "unet": "U-Net"}

        def size(a: str, n: int) -> str:
            return f"depth {n}" if a == "unet" else f"{n} blocks"

        hint = f"set --teacher-width {width} (and distill-gan.teacher_arch={arch}) to use it"
        if arch == "unet":
            hint = f"set --teacher-width {width}, --teacher-arch unet and distill-gan.unet_depth={blocks} to use it"
        raise CheckpointError(
            f"{path} holds a {names[arch]} generator of width {width} with {size(arch, blocks)}; this recipe's teacher "
            f"is a {names[wanted[0]]} of width {wanted[1]} with {size(wanted[0], wanted[2])}",
            hint=hint,
        )
    saved_task = saved.get("distill-gan", {}).get("task")
    if saved_task and saved_task != cfg.task:
        raise CheckpointError(f"{path} is a {saved_task} teacher; this recipe's task is {cfg.task}")
    g = make_generator(arch, width, blocks, cfg.unet_dropout)
    load_model_weights(g, g_state, f"{path} (teacher G_A)")
    d = None
    if need_d:
        if not d_state:
            raise CheckpointError(
                f"{path} holds the teacher generator only; the student's adversarial term needs the teacher's "
                "discriminator",
                hint="pass the teacher's run folder or checkpoints/last.safetensors, or set distill-gan.adv_weight=0",
            )
        norm = discriminator_norm(d_state)
        if norm != cfg.disc_norm:
            names = {"instance": "InstanceNorm", "batch": "BatchNorm"}
            raise CheckpointError(
                f"{path} holds a teacher discriminator with {names[norm]}; this recipe's distill-gan.disc_norm is "
                f"{cfg.disc_norm} ({names[cfg.disc_norm]})",
                hint=f"set distill-gan.disc_norm={norm} (--set distill-gan.disc_norm={norm}) to use it",
            )
        first = d_state.get("model.0.weight")
        ndf, in_ch = cfg.resolved("ndf"), disc_in_channels(cfg.task)
        if first is not None and first.dim() == 4 and tuple(first.shape[:2]) != (ndf, in_ch):
            found_ndf, found_in = first.shape[:2]
            hint = f"set distill-gan.ndf={found_ndf} to use it" if found_in == in_ch else "pass a teacher of this task"
            raise CheckpointError(
                f"{path} holds a teacher discriminator of width (ndf) {found_ndf} on {found_in} input channels; "
                f"this recipe's is ndf {ndf} on {in_ch} ({cfg.task})",
                hint=hint,
            )
        d = make_discriminator(cfg.task, ndf, norm)
        load_model_weights(d, d_state, f"{path} (teacher D_A)")
    return g, d, str(path)


# --------------------------------------------------------------------------------------------------
# the schedule of the online CycleGAN algorithm


def online_phase(step: int, teacher_steps: int, n_dis: int) -> str:
    """``teacher`` or ``student``: cycles of ``teacher_steps`` teacher steps then ``n_dis x teacher_steps``
    student steps."""
    cycle = teacher_steps * (1 + n_dis)
    return "teacher" if step % cycle < teacher_steps else "student"


def teacher_steps_done(step: int, teacher_steps: int, n_dis: int) -> int:
    """Teacher steps among the first ``step`` steps of the online schedule."""
    cycle = teacher_steps * (1 + n_dis)
    return (step // cycle) * teacher_steps + min(step % cycle, teacher_steps)


def teacher_epoch_decay(epoch: int, total_epochs: int, start_epoch: int) -> float:
    """lr factor of teacher epoch ``epoch``: 1 until ``start_epoch``, then linearly to 0 at ``total_epochs``."""
    if epoch < start_epoch or total_epochs <= start_epoch:
        return 1.0
    return max(0.0, 1.0 - (epoch - start_epoch) / (total_epochs - start_epoch))


# --------------------------------------------------------------------------------------------------


class DistillGanMethod(Method):
    """Teacher GAN training and CRD student distillation (see the module docstring)."""

    owns_step = True

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        cfg = self.cfg
        self.weights_module = "S" if cfg.stage == "student" else "G_A"
        self.online = cfg.stage == "student" and cfg.teacher is None
        self.teacher_ready = False  # G_A holds a trained teacher (student metrics against it are meaningful)
        self.teacher_source = ""
        self.vgg_used = "none"
        self.pools: dict[str, Any] = {}

    # --- building -----------------------------------------------------------------------------

    def build_data(self, ctx: Any) -> Any:
        from evcli.data.gan import build_gan_data

        return build_gan_data(self.recipe)

    def _teacher_modules(self) -> dict[str, nn.Module]:
        cfg, size = self.cfg, self.recipe.data.img_size
        mods = {
            "G_A": recipe_generator(cfg, "teacher", size),
            "D_A": make_discriminator(cfg.task, cfg.resolved("ndf"), cfg.disc_norm),
        }
        if cfg.task == "cyclegan":
            mods["G_B"] = recipe_generator(cfg, "teacher", size)
            mods["D_B"] = make_discriminator(cfg.task, cfg.resolved("ndf"), cfg.disc_norm)
        return {k: mods[k] for k in ("G_A", "G_B", "D_A", "D_B") if k in mods}

    def build(self, ctx: Any) -> dict[str, nn.Module | Frozen]:
        from evcli.methods.distill_gan.losses import ImagePool

        cfg = self.cfg
        if cfg.stage == "teacher":
            self.pools = {"A": ImagePool(cfg.pool_size), "B": ImagePool(cfg.pool_size)}
            self.teacher_ready = ctx.training  # G_B is trained too (plain exported weights hold G_A only)
            return dict(self._teacher_modules())
        size = self.recipe.data.img_size
        modules: dict[str, nn.Module | Frozen] = {"S": recipe_generator(cfg, "student", size)}
        if self.online:
            self.pools = {"A": ImagePool(cfg.pool_size), "B": ImagePool(cfg.pool_size)}
            modules.update(self._teacher_modules())
            self.teacher_source = "trained online in this run"
            self.teacher_ready = ctx.training
        else:
            need_d = ctx.training and self._adv_weight() > 0
            source = Path(cfg.teacher).expanduser()
            if not ctx.training and not source.exists():
                from evcli.console import warn

                warn(f"teacher {source} not found here: no student-vs-teacher metrics")
            else:
                # a frozen module runs in eval mode: a U-Net teacher's BatchNorm uses its running statistics
                g, d, path = load_teacher(source, cfg, need_d, size)
                modules["G_A"] = Frozen(g.requires_grad_(False), f"teacher generator from {path}")
                if d is not None:
                    modules["D_A"] = Frozen(d.requires_grad_(False), f"teacher discriminator from {path} (frozen)")
                self.teacher_source, self.teacher_ready = path, True
        if ctx.training and cfg.uses_vgg():
            from evcli.methods.deshadow.layers import vgg16_features
            from evcli.methods.distill_gan.losses import VGGTaps

            source = cfg.vgg
            if source == "auto":
                source = "pretrained" if self.recipe.data.path is not None or cfg.vgg_weights else "random"
            try:
                features, self.vgg_used = vgg16_features(source, cfg.vgg_weights)
            except CheckpointError as exc:
                if source != "pretrained" or cfg.vgg_weights:
                    raise
                raise CheckpointError(
                    "the style and feature terms need ImageNet VGG16 weights and none are available offline "
                    "(torchvision's cache is empty)",
                    hint="pass --vgg-weights vgg16.safetensors, or --vgg random, or set distill-gan.style_weight=0 "
                    "and distill-gan.feature_weight=0",
                ) from exc
            modules["vgg"] = Frozen(VGGTaps(features).requires_grad_(False), self.vgg_used)
        elif cfg.stage == "student" and not cfg.uses_vgg():
            self.vgg_used = "none (style and feature terms off)"
        if cfg.inception_weights:
            from evcli.methods.distill_gan.fid import InceptionPool

            net = InceptionPool(cfg.inception_weights).requires_grad_(False)
            modules["inception"] = Frozen(net, f"torchvision InceptionV3 from {cfg.inception_weights} (FID)")
        return modules

    def _adv_weight(self) -> float:
        cfg = self.cfg
        return float(cfg.resolved("adv_weight")) if cfg.student_loss == "crd" and cfg.task == "cyclegan" else 0.0

    # --- optimizers and schedule --------------------------------------------------------------

    def _teacher_steps(self, ctx: Any) -> int:
        return max(1, ctx.resolve(self.cfg.teacher_phase))

    def _online_cycle(self) -> bool:
        return self.online and self.cfg.task == "cyclegan"

    def optimizers(self, modules: Any, ctx: Any) -> dict[str, OptimizerSpec]:
        cfg = self.cfg
        names = [n for n in ("G_A", "G_B", "D_A", "D_B", "S") if n in modules.trained]

        def params(prefix: str) -> list[Any]:
            return [p for n in names if n.startswith(prefix) for p in modules.unwrap(n).parameters()]

        groups = {"S": params("S")} if cfg.stage == "student" else {}
        if cfg.stage == "teacher" or self.online:
            groups.update({"G": params("G_"), "D": params("D_")})
        if not self._online_cycle():
            schedule = dataclasses.replace(self.recipe.schedule, sched="linear", decay_start=cfg.decay_start)
            return {n: OptimizerSpec([{"params": p}], schedule=schedule) for n, p in groups.items()}
        # online CycleGAN: every lr follows the teacher's epochs (the card: schedulers step once per teacher epoch)
        t_steps, n_dis, spe = self._teacher_steps(ctx), int(cfg.resolved("n_dis")), max(1, ctx.steps_per_epoch)
        total_teacher = teacher_steps_done(ctx.total_steps, t_steps, n_dis)
        from evcli.durations import parse_duration

        total_epochs = max(1, -(-total_teacher // spe))
        amount, unit = parse_duration(cfg.decay_start)  # in the teacher's own epochs
        start_epoch = {"%": round(amount / 100 * total_epochs), "ep": int(amount)}.get(unit, int(amount) // spe)

        def factor(step: int) -> float:
            return teacher_epoch_decay(teacher_steps_done(step, t_steps, n_dis) // spe, total_epochs, start_epoch)

        constant = dataclasses.replace(self.recipe.schedule, sched="constant")
        return {n: OptimizerSpec([{"params": p, "lr_factor": factor}], schedule=constant) for n, p in groups.items()}

    def phase(self, ctx: Any) -> str:
        """What the current step trains: ``teacher``, ``student``, or ``both`` (online Pix2Pix)."""
        if self.cfg.stage == "teacher":
            return "teacher"
        if not self.online:
            return "student"
        if self.cfg.task == "pix2pix":
            return "both"
        return online_phase(ctx.step, self._teacher_steps(ctx), int(self.cfg.resolved("n_dis")))

    # --- training -----------------------------------------------------------------------------

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        phase = self.phase(ctx)
        logs: dict[str, torch.Tensor] = {}
        total = batch["A"].new_zeros(())
        if phase == "teacher":
            total = (
                self._cyclegan_step(modules, batch, ctx, logs)
                if self.cfg.task == "cyclegan"
                else (self._pix2pix_step(modules, batch, ctx, logs, update_g=True)[0])
            )
        elif phase == "both":
            update_g = ctx.step % int(self.cfg.resolved("n_dis")) == 0
            total, teacher_out = self._pix2pix_step(modules, batch, ctx, logs, update_g=update_g)
            total = total + self._student_step(modules, batch, ctx, logs, teacher_out)
        else:
            total = self._student_step(modules, batch, ctx, logs, None)
        logs["phase_student"] = torch.tensor(float(phase != "teacher"))
        return StepOutput(total.detach(), logs)

    def _cyclegan_step(self, modules: Any, batch: Any, ctx: Any, logs: dict) -> torch.Tensor:
        """One CycleGAN teacher step: G_A and G_B (adversarial + cycle + identity), then D_A and D_B on pooled
        fakes. Each trained module is called once through its (DDP) wrapper; repeated uses go to the module
        itself, whose gradients the wrapper's hooks still see. The generators' adversarial terms show the
        discriminators the fake batch alone (BatchNorm or not)."""
        from evcli.methods.distill_gan.losses import gan_loss

        cfg, mode = self.cfg, self.cfg.resolved("gan_mode")
        a, b = batch["A"], batch["B"]
        n = len(a)
        out_a = modules.G_A(torch.cat([a, b]))  # fake_B = G_A(A), idt_A = G_A(B)
        fake_b, idt_a = out_a[:n], out_a[n:]
        out_b = modules.G_B(torch.cat([fake_b, b, a]))  # rec_A, fake_A, idt_B
        rec_a, fake_a, idt_b = out_b[:n], out_b[n : 2 * n], out_b[2 * n :]
        rec_b = modules.unwrap("G_A")(fake_a)
        d_a, d_b = modules.unwrap("D_A"), modules.unwrap("D_B")
        adv = gan_loss(d_a(fake_b), True, mode, False) + gan_loss(d_b(fake_a), True, mode, False)
        cycle = cfg.lambda_cycle * (F.l1_loss(rec_a, a) + F.l1_loss(rec_b, b))
        idt = cfg.lambda_cycle * cfg.lambda_identity * (F.l1_loss(idt_a, b) + F.l1_loss(idt_b, a))
        loss_g = adv + cycle + idt
        ctx.step_optimizer("G", loss_g)
        pooled_b = self.pools["B"].query(fake_b.detach())  # D_A judges B images
        pooled_a = self.pools["A"].query(fake_a.detach())
        batch_norm = cfg.disc_norm == "batch"
        d_a_real, d_a_fake = judge_real_fake(modules, "D_A", b, pooled_b, batch_norm)
        d_b_real, d_b_fake = judge_real_fake(modules, "D_B", a, pooled_a, batch_norm)
        loss_d = 0.5 * (gan_loss(d_a_real, True, mode) + gan_loss(d_a_fake, False, mode))
        loss_d = loss_d + 0.5 * (gan_loss(d_b_real, True, mode) + gan_loss(d_b_fake, False, mode))
        ctx.step_optimizer("D", loss_d)
        logs.update(g_adv=adv.detach(), g_cycle=cycle.detach(), g_idt=idt.detach(), d=loss_d.detach())
        return loss_g.detach() + loss_d.detach()

    def _pix2pix_step(
        self, modules: Any, batch: Any, ctx: Any, logs: dict, update_g: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Pix2Pix teacher step: G (GAN + lambda_recon x L1, through the D before this step's update), then
        D on (A, B) vs (A, G(A)). Returns the losses and the teacher's output (detached)."""
        from evcli.methods.distill_gan.losses import gan_loss

        cfg, mode = self.cfg, self.cfg.resolved("gan_mode")
        a, b = batch["A"], batch["B"]
        fake = modules.G_A(a)
        total = a.new_zeros(())
        if update_g:
            adv = gan_loss(modules.unwrap("D_A")(torch.cat([a, fake], 1)), True, mode, False)
            recon = cfg.lambda_recon * F.l1_loss(fake, b)
            ctx.step_optimizer("G", adv + recon)
            logs.update(g_adv=adv.detach(), g_recon=recon.detach())
            total = total + (adv + recon).detach()
        real_ab, fake_ab = torch.cat([a, b], 1), torch.cat([a, fake.detach()], 1)
        pred_real, pred_fake = judge_real_fake(modules, "D_A", real_ab, fake_ab, cfg.disc_norm == "batch", True)
        loss_d = 0.5 * (gan_loss(pred_real, True, mode) + gan_loss(pred_fake, False, mode))
        ctx.step_optimizer("D", loss_d)
        logs["d"] = loss_d.detach()
        return total + loss_d.detach(), fake.detach()

    def student_losses(
        self, modules: Any, a: torch.Tensor, s: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The weighted terms of the student loss for student output ``s`` and teacher output ``t``."""
        from evcli.methods.distill_gan.losses import gan_loss, relation_losses, style_feature_losses

        cfg = self.cfg
        if cfg.student_loss == "l1":
            return {"l1": F.l1_loss(s, t)}
        w_rows, w_cols, w_patch = cfg.resolved("relation_weights")
        rel = relation_losses(s, t, cfg.patch_size, cfg.resolved("relation_reduce"), cfg.patch_mode)
        terms = {"rows": w_rows * rel["rows"], "cols": w_cols * rel["cols"], "patch": w_patch * rel["patch"]}
        if "vgg" in modules:
            style, feature = style_feature_losses(modules["vgg"], s, t)
            terms["style"] = cfg.resolved("style_weight") * style
            terms["feature"] = cfg.resolved("feature_weight") * feature
        adv_w = self._adv_weight()
        if adv_w > 0:
            # D_A sees the student's batch alone. From a file it is frozen (eval mode: a BatchNorm D uses its running
            # statistics); trained online it stays in training mode (batch statistics, as the release would run it)
            d_a = modules.unwrap("D_A") if "D_A" in modules.trained else modules["D_A"]
            terms["adv"] = adv_w * gan_loss(d_a(s), True, cfg.resolved("gan_mode"), False)
        return terms

    def _student_step(
        self, modules: Any, batch: Any, ctx: Any, logs: dict, teacher_out: torch.Tensor | None
    ) -> torch.Tensor:
        a = batch["A"]
        if teacher_out is None:
            with torch.no_grad():
                teacher_out = modules.unwrap("G_A")(a) if "G_A" in modules.trained else modules["G_A"](a)
        s = modules.S(a)
        terms = self.student_losses(modules, a, s, teacher_out)
        loss = sum(terms.values())
        ctx.step_optimizer("S", loss)
        logs.update({f"s_{k}": v.detach() for k, v in terms.items()})
        return loss.detach()

    # --- evaluation ---------------------------------------------------------------------------

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        from evcli.metrics.image import psnr, ssim

        a = batch["A"]
        out = modules[self.weights_module](a).float()
        unit = (out + 1) / 2
        sums = {"n": torch.tensor(float(len(a)), device=a.device)}
        if self.cfg.stage == "student" and self.teacher_ready and "G_A" in modules:
            t = (modules["G_A"](a).float() + 1) / 2
            sums["psnr_vs_teacher"] = psnr(unit.clamp(0, 1), t.clamp(0, 1)).sum()
            sums["ssim_vs_teacher"] = ssim(unit.clamp(0, 1), t.clamp(0, 1)).sum()
        if self.cfg.task == "pix2pix":
            b = (batch["B"].float() + 1) / 2
            sums["psnr_vs_target"] = psnr(unit.clamp(0, 1), b).sum()
            sums["ssim_vs_target"] = ssim(unit.clamp(0, 1), b).sum()
        elif self.cfg.stage == "teacher" and self.teacher_ready:
            rec = (modules["G_B"](out).float() + 1) / 2
            sums["psnr_cycle"] = psnr(rec.clamp(0, 1), (a.float() + 1) / 2).sum()
        if "inception" in modules:
            from evcli.methods.distill_gan.fid import moments

            for side, images in (("fake", out), ("real", batch["B"])):
                sums.update({f"fid_{side}_{k}": v for k, v in moments(modules["inception"](images)).items()})
        return sums

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        n = float(sums["n"])
        metrics = {k: float(v) / max(n, 1.0) for k, v in sums.items() if k != "n" and not k.startswith("fid_")}
        if "fid_fake_n" in sums:
            from evcli.methods.distill_gan.fid import frechet_distance

            fake, real = ({k: sums[f"fid_{side}_{k}"] for k in ("n", "sum", "outer")} for side in ("fake", "real"))
            metrics["fid"] = frechet_distance(fake, real)
        return metrics

    # --- the end ------------------------------------------------------------------------------

    def cost(self) -> dict[str, Any]:
        """MACs and parameters of the teacher and student generators at 256x256 (counter named)."""
        from evcli.methods.distill_gan.cost import count_cost

        cfg, size = self.cfg, self.recipe.data.img_size  # a U-Net's depth (<= 8) divides 256
        teacher = count_cost(recipe_generator(cfg, "teacher", size))
        out = {"teacher": teacher}
        if cfg.stage == "student":
            out["student"] = count_cost(recipe_generator(cfg, "student", size))
            out["macs_reduction"] = teacher["macs"] / out["student"]["macs"]
            out["params_reduction"] = teacher["params"] / out["student"]["params"]
        return out

    @torch.no_grad()
    def artifacts(self, modules: Any, out_dir: Any, ctx: Any) -> dict[str, str]:
        """input | teacher | student grids of the first 4 val images (pictures/), and the online teacher."""
        from evcli.io.checkpoint import save_weights
        from evcli.io.images import save_png

        folder = Path(out_dir) / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        data = next(iter(ctx.engine.val_sets().values()))
        files = {"pictures": str(folder)}
        # as evaluated and exported: a U-Net's BatchNorm with its running statistics, no dropout
        generators = [modules[n] for n in ("G_A", "S") if n in modules]
        modes = [g.training for g in generators]
        for g in generators:
            g.eval()
        try:
            for i in range(min(4, len(data))):
                a = data[(0, i)]["A"][None].to(ctx.device)
                row = [a]
                if "G_A" in modules and (self.teacher_ready or self.cfg.stage == "teacher"):
                    row.append(modules["G_A"](a))
                if "S" in modules:
                    row.append(modules["S"](a))
                gap = torch.ones_like(a[..., :4])
                parts = [x for r in row for x in (r.float(), gap)][:-1]
                save_png(((torch.cat(parts, dim=3)[0] + 1) / 2).cpu(), folder / f"val_{i}_input_teacher_student.png")
        finally:
            for g, mode in zip(generators, modes):
                g.train(mode)
        if self.online:
            meta = {**ctx.engine.checkpoint_meta(), "role": "teacher G_A trained online"}
            path = Path(out_dir) / "teacher.safetensors"
            save_weights(path, dict(modules.unwrap("G_A").state_dict()), meta)
            files["teacher_weights"] = str(path)
        return files

    def report_extras(self, ctx: Any) -> dict[str, Any]:
        return {
            "stage": self.cfg.stage,
            "task": self.cfg.task,
            "student_loss": self.cfg.student_loss if self.cfg.stage == "student" else None,
            "teacher": self.teacher_source or None,
            "vgg": self.vgg_used,
            "fid_network": (
                f"torchvision InceptionV3 pool features from {self.cfg.inception_weights} (not pytorch-fid's FID "
                "Inception: not comparable with the papers' FIDs); real statistics from the val target images"
                if self.cfg.inception_weights
                else "none (no --inception-weights: no FID)"
            ),
            "cost_at_256": self.cost(),
        }

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {f"pool_{k}": pool.state() for k, pool in self.pools.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, pool in self.pools.items():
            pool.load(state.get(f"pool_{k}"))
        if self.online or self.cfg.stage == "teacher":
            self.teacher_ready = True  # a training checkpoint holds the whole teacher (G_B too)
