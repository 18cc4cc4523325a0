"""Recipe schema of ``evcli distill-gan`` (the ``distill-gan:`` section). Torch-free: loaded by --help and
recipes.

Task defaults (CycleGAN / Pix2Pix, from the CRD card) are ``null`` in the schema and resolved by
:meth:`DistillGanConfig.resolved`, so one recipe key can override them and the rest follow the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from evcli.durations import Duration
from evcli.errors import RecipeError
from evcli.registry import register_command

# CycleGAN / Pix2Pix values of the keys whose schema default is null (the card's table)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "cyclegan": {
        "ndf": 64,
        "gan_mode": "lsgan",
        "n_dis": 4,
        "relation_weights": [25.0, 25.0, 25.0],
        "relation_reduce": "mean",
        "style_weight": 1e4,
        "feature_weight": 10.0,
        "adv_weight": 1.0,
    },
    "pix2pix": {
        "ndf": 128,
        "gan_mode": "hinge",
        "n_dis": 1,
        "relation_weights": [2.5, 2.5, 2.5],
        "relation_reduce": "sum",
        "style_weight": 2e4,  # 2 x lambda_style 1e4
        "feature_weight": 20.0,  # 2 x lambda_feature 10
        "adv_weight": 0.0,  # the Pix2Pix student has no adversarial term
    },
}


def default_unet_depth(img_size: int, cap: int = 8) -> int:
    """The deepest U-Net (at most ``cap`` downsamplings) whose input side ``img_size`` divides: 8 (unet_256) at
    256 px and above, 7 at 128, 6 at 64, 5 at 32; 4 at 48 (= 3 x 16)."""
    depth = 0
    while depth < cap and img_size % 2 ** (depth + 1) == 0:
        depth += 1
    return depth


@register_command(
    "distill-gan",
    implementation="evcli.methods.distill_gan.method:DistillGanMethod",
    help="CRD: compress a CycleGAN / Pix2Pix generator into a small student by content-relationship distillation.",
    defaults={
        "model.name": "mobile_resnet",
        "optim.name": "adam",
        "optim.lr": 2e-4,
        "optim.betas": [0.5, 0.999],
        "optim.weight_decay": 0.0,
        "schedule.epochs": 200,
        "schedule.sched": "constant",  # the linear decay is distill-gan.decay_start
        "data.img_size": 256,
        "data.batch_size": 1,
        "data.eval_batch_size": 4,
        "data.workers": 0,
        "train.best_metric": "psnr_vs_teacher",
        "train.best_mode": "max",
        "train.eval_every": "10ep",
    },
)
@dataclass
class DistillGanConfig:
    """Stage, task, networks, losses and schedule of a GAN-compression run."""

    stage: Literal["teacher", "student"] = "student"  # teacher: train the teacher GAN; student: distill (CRD)
    task: Literal["cyclegan", "pix2pix"] = "cyclegan"  # unpaired (two directions, cycle loss) or paired (L1 x 100)
    direction: Literal["AtoB", "BtoA"] = "AtoB"
    # --- networks
    teacher: str | None = None  # student stage: teacher run folder / checkpoint / weights; null: train it online
    # resnet: the original CycleGAN generator; unet: the Pix2Pix U-Net with BatchNorm (Pix2Pix task only)
    teacher_arch: Literal["mobile_resnet", "resnet", "unet"] = "mobile_resnet"
    student_arch: Literal["mobile_resnet", "unet"] = "mobile_resnet"
    teacher_width: int = 64  # ngf of the teacher generator
    student_width: int = 16  # ngf of the student generator
    n_blocks: int = 9  # residual blocks of the ResNet generators
    unet_depth: int | None = None  # U-Net downsamplings (8: unet_256); null: the deepest <= 8 that img_size allows
    unet_dropout: float = 0.0  # dropout of the U-Net's deep 8ngf decoder levels (CRD's release 0; Pix2Pix 0.5)
    ndf: int | None = None  # discriminator width (null: 64 CycleGAN, 128 Pix2Pix)
    # PatchGAN norm; batch: the release's --norm batch (U-Net setting), D called on real and fake batches apart
    disc_norm: Literal["instance", "batch"] = "instance"
    gan_mode: Literal["lsgan", "hinge", "vanilla"] | None = None  # null: lsgan CycleGAN, hinge Pix2Pix
    # --- teacher losses
    lambda_cycle: float = 10.0  # CycleGAN cycle-consistency L1 weight (each direction)
    lambda_identity: float = 0.5  # CycleGAN identity weight, relative to lambda_cycle
    lambda_recon: float = 100.0  # Pix2Pix L1 to the target
    pool_size: int = 50  # CycleGAN history of generated images for the discriminators
    # --- student losses
    student_loss: Literal["crd", "l1"] = "crd"  # crd; l1: the plain output-L1-to-teacher baseline
    relation_weights: list[float] | None = None  # [rows, columns, patches] RKD weights (null: 25 / 2.5 each)
    relation_reduce: Literal["mean", "sum"] | None = None  # over the batch (null: mean CycleGAN, sum Pix2Pix)
    patch_size: int = 32  # side of the non-overlapping patches
    patch_mode: Literal["image", "release_channels"] = "image"  # release_channels: the Pix2Pix release's bug
    style_weight: float | None = None  # Gram L1 over relu1_2..4_3 (null: 1e4 CycleGAN, 2e4 Pix2Pix)
    feature_weight: float | None = None  # relu2_2 L1 (null: 10 CycleGAN, 20 Pix2Pix)
    adv_weight: float | None = None  # LSGAN term from the frozen teacher D (null: 1 CycleGAN, 0 Pix2Pix)
    vgg: Literal["auto", "pretrained", "random"] = "auto"  # auto: pretrained with --data, random on built-in data
    vgg_weights: str | None = None  # ImageNet VGG16 as .safetensors (else torchvision's local cache)
    inception_weights: str | None = None  # torchvision InceptionV3 .safetensors: FID of the outputs vs val targets
    # --- schedule
    n_dis: int | None = None  # CycleGAN online: student epochs per teacher epoch (null: 4); Pix2Pix: teacher every n
    teacher_phase: Duration = Duration("10ep")  # CycleGAN online: teacher training between student phases
    # lr constant until here, then linear to 0 (online CycleGAN: in teacher epochs)
    decay_start: Duration = Duration("50%")
    # --- data
    load_size: int | None = None  # training resize before the random crop (null: img_size x 286/256)
    builtin_samples: int = 64  # built-in data: training crops per epoch

    LIMITS: ClassVar[dict[str, str]] = {
        "teacher_width": ">= 1, <= 4096",
        "student_width": ">= 1, <= 4096",
        "n_blocks": ">= 1, <= 64",
        "unet_depth": ">= 2, <= 8",
        "unet_dropout": "[0, 1)",
        "ndf": ">= 1, <= 4096",
        "lambda_cycle": ">= 0",
        "lambda_identity": ">= 0",
        "lambda_recon": ">= 0",
        "pool_size": ">= 0, <= 100000",
        "relation_weights": ">= 0",
        "patch_size": ">= 1, <= 65536",
        "style_weight": ">= 0",
        "feature_weight": ">= 0",
        "adv_weight": ">= 0",
        "n_dis": ">= 1, <= 1000",
        "load_size": ">= 1, <= 65536",
        "builtin_samples": ">= 1, <= 100000000",
    }

    def resolved(self, key: str) -> Any:
        """A key's value, its task default when null."""
        value = getattr(self, key)
        return TASK_DEFAULTS[self.task][key] if value is None else value

    def resolved_load_size(self, img_size: int) -> int:
        return self.load_size or max(img_size, round(img_size * 286 / 256))

    def resolved_unet_depth(self, img_size: int) -> int:
        """``unet_depth``, or the deepest U-Net (at most 8 downsamplings) whose input side ``img_size`` divides:
        8 (unet_256) at 256 px, 6 at 64 px, 5 at 32 px."""
        return default_unet_depth(img_size) if self.unet_depth is None else self.unet_depth

    def generator_spec(self, role: Literal["teacher", "student"], img_size: int) -> tuple[str, int, int]:
        """(architecture, width, residual blocks or U-Net depth) of the teacher or student generator: the triple
        ``make_generator`` builds and ``describe_generator`` reads back from weights."""
        arch = self.teacher_arch if role == "teacher" else self.student_arch
        width = self.teacher_width if role == "teacher" else self.student_width
        return arch, width, self.resolved_unet_depth(img_size) if arch == "unet" else self.n_blocks

    def uses_vgg(self) -> bool:
        return (
            self.stage == "student"
            and self.student_loss == "crd"
            and (self.resolved("style_weight") > 0 or self.resolved("feature_weight") > 0)
        )

    def validate(self, recipe: Any) -> None:
        """Cross-key checks (and model.name mirrors the trained generator)."""
        width = self.student_width if self.stage == "student" else self.teacher_width
        for key in ("teacher", "inception_weights", "vgg_weights"):
            value = getattr(self, key)
            if value and not Path(value).expanduser().is_absolute():
                # stored absolute: eval, export and resume from another directory find the same file
                setattr(self, key, str(Path(value).expanduser().absolute()))
        archs = {"teacher": self.teacher_arch, "student": self.student_arch}
        for role, arch in archs.items():
            key = f"{role}_width"
            if arch != "unet" and getattr(self, key) % 4:  # the U-Net has no width rule
                raise RecipeError(
                    f"recipe key 'distill-gan.{key}' must be a multiple of 4 (the generator halves 4 x width "
                    f"twice), got {getattr(self, key)}"
                )
        recipe.model.name = f"{archs[self.stage]}_w{width}"
        size = recipe.data.img_size
        if size % 4:
            raise RecipeError(f"recipe key 'data.img_size' must be a multiple of 4 for these generators, got {size}")
        if "unet" in archs.values():
            depth = self.resolved_unet_depth(size)
            if size % 2**depth:
                raise RecipeError(
                    f"recipe key 'data.img_size' must be divisible by 2**distill-gan.unet_depth = {2**depth} for the "
                    f"U-Net generator, got {size}",
                    hint=f"set distill-gan.unet_depth={default_unet_depth(size)} or null (the deepest U-Net the "
                    f"size allows), or a data.img_size divisible by {2**depth}",
                )
        if self.task == "cyclegan" and self.teacher_arch == "unet":
            raise RecipeError(
                "distill-gan.teacher_arch=unet is the card's Pix2Pix teacher: the CycleGAN teacher step runs G_A on "
                "A and B as one batch, which the U-Net's BatchNorm would mix",
                hint="set the pix2pix task (--task pix2pix or --set distill-gan.task=pix2pix), or a ResNet teacher "
                "(a U-Net student is fine for CycleGAN)",
            )
        if self.resolved_load_size(size) < size:
            raise RecipeError(f"recipe key 'distill-gan.load_size' must be >= data.img_size ({size})")
        if self.stage == "student" and self.student_loss == "crd":
            if len(self.resolved("relation_weights")) != 3:
                raise RecipeError(
                    "recipe key 'distill-gan.relation_weights' must be three weights [rows, columns, patches]"
                )
            if (size // self.patch_size) ** 2 < 2 and self.resolved("relation_weights")[2] > 0:
                raise RecipeError(
                    f"distill-gan.patch_size {self.patch_size} leaves fewer than 2 patches in a {size} px image",
                    hint="lower distill-gan.patch_size (the paper: 32 at 256 px)",
                )
        if self.patch_mode == "release_channels" and self.task != "pix2pix":
            raise RecipeError("distill-gan.patch_mode=release_channels reproduces the Pix2Pix release only")
        if self.vgg == "random" and self.vgg_weights:
            raise RecipeError("distill-gan.vgg=random and distill-gan.vgg_weights contradict each other")
