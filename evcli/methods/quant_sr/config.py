"""Recipe schema of ``evcli quant-sr`` (the ``quant-sr:`` section). Torch-free: loaded by --help and recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from evcli.durations import Duration
from evcli.errors import RecipeError
from evcli.registry import register_command

ARCH_NAMES = ("edsr_baseline", "edsr", "srresnet")
BENCHMARK_SETS = ["Set5", "Set14", "B100", "Urban100"]


@register_command(
    "quant-sr",
    implementation="evcli.methods.quant_sr.method:QuantSRMethod",
    help="Ultra-low-bit super-resolution: DDTB (dual trainable bounds + dynamic gate) or PAMS on EDSR/SRResNet.",
    defaults={
        "model.name": "edsr_baseline",
        "optim.name": "adam",
        "optim.lr": 1e-4,
        "optim.betas": [0.9, 0.999],
        "optim.eps": 1e-8,
        "optim.weight_decay": 0.0,
        # DDTB: 60 epochs counting the calibration epoch, lr halved every 10 (the scheduler counts epoch 1):
        # 59 training epochs, halvings after training epochs 9, 19, 29, 39, 49 (relative: --epochs rescales)
        "schedule.epochs": 59,
        "schedule.sched": "step",
        "schedule.milestones": ["15.254%", "32.203%", "49.153%", "66.102%", "83.051%"],  # 9/59, 19/59, ...
        "schedule.gamma": 0.5,
        "data.img_size": 192,
        "data.batch_size": 16,
        "data.eval_batch_size": 1,
        "train.best_metric": "psnr",
        "train.best_mode": "max",
        "train.eval_every": "1ep",
    },
)
@dataclass
class QuantSRConfig:
    """Network, quantizer, distillation, schedule and data of a quantized super-resolution run."""

    method: Literal["ddtb", "pams"] = "ddtb"  # quantizer family (bits 32: full precision, no quantizers)
    bits: int = 4  # 2, 3 or 4 (the paper's) up to 8; 32 trains the full-precision network
    scale: int = 4  # upscaling factor: 2, 3 or 4
    arch: Literal["edsr_baseline", "edsr", "srresnet"] = "edsr_baseline"  # model.name mirrors it
    blocks: int | None = None  # residual blocks (null: 16 edsr_baseline / 32 edsr / 16 srresnet)
    channels: int | None = None  # feature channels (null: 64 / 256 / 64)
    res_scale: float | None = None  # EDSR residual scale (null: 1.0 baseline, 0.1 edsr)
    teacher: str | None = None  # full-precision weights (.safetensors, or a --bits 32 run folder) to distil from
    # --- DDTB
    dynamic_ratio: float | None = None  # fraction of activation quantizers given a gate (null: EDSR 0.3, SRResNet 0.1)
    bound_percentile: float = 99.0  # bounds start at the M-th / (100-M)-th percentile (M = 99 EDSR/SRResNet)
    bound_init: Literal["all_bits", "release"] = "all_bits"  # release: only 2-bit calibrated, else +-10
    gate_grad: Literal["ste", "release"] = "ste"  # ste: gradients through the gate's 2-bit quantizers (paper);
    # release: its input detached, so only the gate's last 1x1 conv learns (the released code)
    gate_warmup: Duration = Duration("6.78%")  # gates pushed to beta = 1 (epochs 2-5 of the paper's 60: 4 of 59)
    weight_clip: float = 99.0  # DDTB weights: clamp to the [100 - p, p] percentiles
    calib_batches: int = 100  # batches of the calibration pass (paper: one epoch, 1000 batches)
    # --- losses and optimizers
    w_l1: float = 1.0
    w_at: float = 1000.0  # attention transfer on the body feature (0: no distillation)
    w_gate: float = 1.0  # the warm-up's MSE(gate logits, 0)
    bound_lr: float = 1e-2  # Adam lr of the bound parameters (upper / lower, PAMS alpha); weights use optim.lr
    # --- data
    benchmark: str | None = None  # folder holding Set5/ Set14/ B100/ Urban100/ (each HR/ or HR/ + LR_bicubic/X<s>/)
    val_sets: list[str] = field(default_factory=lambda: list(BENCHMARK_SETS))  # subfolders of benchmark to evaluate
    repeat: int = 20  # training patches per HR image per epoch (DIV2K: 800 images x 20 = 16000 = 1000 x 16)
    augment: bool = True  # random h-flip, v-flip, transpose
    cache: bool = False  # keep decoded HR training images in memory (8-bit; DIV2K's 800 take ~7 GB per worker)
    val_crop: int | None = None  # centre-crop val HR images to this size (null: whole images)
    builtin_val_crop: int | None = 256  # the built-in held-out photos are centre-cropped to this (null: whole)

    LIMITS: ClassVar[dict[str, str]] = {
        "bits": ">= 2, <= 32",
        "scale": ">= 2, <= 4",
        "blocks": ">= 1, <= 256",
        "channels": ">= 4, <= 4096",
        "res_scale": "> 0",
        "dynamic_ratio": "[0, 1]",
        "bound_percentile": "(50, 100]",
        "weight_clip": "(50, 100]",
        "calib_batches": ">= 1, <= 1000000",
        "w_l1": ">= 0",
        "w_at": ">= 0",
        "w_gate": ">= 0",
        "bound_lr": "> 0",
        "repeat": ">= 1, <= 100000",
        "val_crop": ">= 8, <= 65536",
        "builtin_val_crop": ">= 8, <= 65536",
    }

    def resolved_ratio(self) -> float:
        if self.dynamic_ratio is not None:
            return self.dynamic_ratio
        return 0.1 if self.arch == "srresnet" else 0.3

    def validate(self, recipe: Any) -> None:
        """Cross-key checks: bit width, scale, patch size, model.name = arch."""
        if self.bits not in (2, 3, 4, 5, 6, 7, 8, 32):
            raise RecipeError(
                f"recipe key 'quant-sr.bits' must be 2-8 (quantized) or 32 (full precision), got {self.bits}"
            )
        if self.scale not in (2, 3, 4):
            raise RecipeError(f"recipe key 'quant-sr.scale' must be 2, 3 or 4, got {self.scale}")
        if recipe.model.name in ARCH_NAMES or recipe.model.name == "deit_tiny_patch16_224":
            recipe.model.name = self.arch
        elif recipe.model.name != self.arch:
            raise RecipeError(f"model.name {recipe.model.name!r} must be one of {', '.join(ARCH_NAMES)}")
        if self.bits < 32 and self.method == "ddtb" and recipe.data.batch_size < 2:
            raise RecipeError(
                "DDTB's gates hold batch normalisation: quantized training needs data.batch_size >= 2, got 1"
            )
        size = recipe.data.img_size
        if size % self.scale or size // self.scale < 4:
            raise RecipeError(
                f"recipe key 'data.img_size' (the HR patch) must be a multiple of the scale {self.scale} with an "
                f"LR patch of at least 4 px, got {size}",
                hint=f"e.g. {48 * self.scale} (the paper's LR patch 48)",
            )
