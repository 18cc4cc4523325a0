"""Recipe schema of ``evcli deshadow`` (the ``deshadow:`` section). Torch-free: loaded by --help and recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from evcli.durations import Duration
from evcli.errors import RecipeError
from evcli.registry import register_command

METHODS = ("labnet", "sadc", "detector")


@register_command(
    "deshadow",
    implementation="evcli.methods.deshadow.method:DeshadowMethod",
    help="Mask-guided shadow removal: LAB-Net (LAB, dual stream, ECA, LSA) or SADC (shadow-aware dynamic conv).",
    defaults={
        "model.name": "labnet",
        "optim.name": "adam",
        "optim.lr": 2e-4,
        "optim.betas": [0.9, 0.999],
        "optim.weight_decay": 0.0,
        "schedule.epochs": 300,
        "schedule.sched": "constant",  # the linear decay of the papers is deshadow.lr_decay_start
        "data.img_size": 256,
        "data.batch_size": 2,
        "data.eval_batch_size": 1,
        "train.best_metric": "lab_mae_all",
        "train.best_mode": "min",
        "train.eval_every": "10ep",
    },
)
@dataclass
class DeshadowConfig:
    """Network, losses, data layout and evaluation protocol of a shadow-removal run."""

    method: Literal["labnet", "sadc", "detector"] = "labnet"  # model.name mirrors it; detector: the shadow detector
    # --- data
    layout: Literal["auto", "istd", "srd"] = "auto"  # layout of data.path (auto: train_A/ -> istd, else srd)
    mask_dir: str | None = None  # SRD masks: DIR/{train,test}/ or DIR (default: data.path/{split}/mask)
    load_size: int = 256  # augmentation: random shorter side in [load_size, max_size) (papers: 256)
    max_size: int = 480
    rotate: float = 20.0  # augmentation: random rotation in degrees (+-)
    test_size: list[int] | None = None  # [w, h] to resize test images to (papers: [640, 480] ISTD); null: native
    builtin_train_samples: int = 256  # built-in data: rendered crops per epoch (size data.img_size)
    builtin_val_samples: int = 8  # built-in data: rendered val images (held-out photos)
    builtin_val_size: int = 128  # built-in data: val image size
    photo_dir: str | None = None  # built-in data: also Debian's opencv-doc example photos (.../examples/data)
    shadow_free: float = 0.0  # built-in data: fraction of samples left without a shadow (empty mask)
    mask_threshold_train: float | None = None  # null: 0.5 for labnet, 0.9 for sadc (the papers')
    mask_threshold_test: float = 0.9
    # training only, not in the papers: the fraction of training samples whose input mask is corrupted like a
    # detector's (border moved, a false region added; the ground truth unchanged), so the remover learns to leave
    # a wrongly masked lit region alone; with > 0 the val also scores results under such masks (noisy_* metrics)
    mask_noise: float = 0.0
    # --- networks
    channels: int | None = None  # null: 32 for labnet, 64 for sadc (the papers' sizes), 16 for the detector
    init: Literal["kaiming", "identity"] = "kaiming"  # kaiming (papers); identity: LAB-Net starts as the identity map
    eca_laplacian: Literal["fixed", "trainable"] = "fixed"  # LAB-Net ECA kernel: paper (fixed) or release
    lsa_size: int = 256  # LAB-Net LSA working size (down_w = down_h: 256 ISTD, 128 SRD); with lsa_stride its cap
    lsa_stride: int | None = None  # null: fixed lsa_size square (papers); N: LSA grid = input / N (train = inference)
    ring_kernel: int = 11  # LAB-Net: dilation square defining the non-shadow ring
    sadc_morph: int = 7  # SADC: erosion/dilation square of the boundary rings
    sadc_sparse: bool = True  # SADC inference evaluates the heavy path only at shadow pixels
    # --- losses and schedule
    perceptual: bool = True  # the VGG16 levels of the perceptual term (false: its pixel-level L1 only)
    perceptual_features: Literal["pre_relu", "post_relu"] = "pre_relu"  # paper (slice outputs) or release (ReLU'd)
    vgg: Literal["pretrained", "random"] = "pretrained"  # VGG16 weights: ImageNet (papers) or random (SADC release)
    vgg_weights: str | None = None  # ImageNet VGG16 as .safetensors (else torchvision's local cache)
    # detector inference: longer side of the working image (null: the training crop size data.img_size, so a
    # whole photo reaches it at the scale of its whole-photo training crops)
    detector_work_size: int | None = None
    detector_pos_weight: float = 2.0  # detector: weight of shadow pixels in its binary cross-entropy
    labnet_loss: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0])  # [perceptual, gradient, mse]
    sadc_loss_scale: float = 100.0  # SADC: L = scale * (perceptual + gradient + c(e) * KD)
    kd_start: Duration = Duration("50ep")  # SADC: c(e) = 0 before, then 1 - cos(pi/2 (e - start)/(E - start))
    lr_decay_start: Duration = Duration("50ep")  # lr constant until here, then linear to 0 (papers: 50 + 250)
    eval_resize: Literal["256x256", "full"] = "256x256"  # evaluation protocol: resize to 256x256, or native

    # ranges of single keys, enforced by the recipe loader (evcli.recipe.check_limit)
    LIMITS: ClassVar[dict[str, str]] = {
        "load_size": ">= 1, <= 65536",
        "max_size": ">= 1, <= 65536",
        "rotate": "[0, 180]",
        "test_size": ">= 1, <= 65536",
        "builtin_train_samples": ">= 1, <= 100000000",
        "builtin_val_samples": ">= 1, <= 100000",
        "builtin_val_size": ">= 8, <= 4096",
        "shadow_free": "[0, 1)",
        "mask_noise": "[0, 1]",
        "lsa_stride": ">= 1, <= 4096",
        "mask_threshold_train": "[0, 1)",
        "mask_threshold_test": "[0, 1)",
        "channels": ">= 8, <= 4096",
        "lsa_size": ">= 4, <= 65536",
        "ring_kernel": ">= 1, <= 255",
        "sadc_morph": ">= 1, <= 255",
        "labnet_loss": ">= 0",
        "sadc_loss_scale": "> 0",
        "detector_pos_weight": "> 0",
        "detector_work_size": ">= 8, <= 65536",
    }

    def resolved_channels(self) -> int:
        return self.channels or {"labnet": 32, "sadc": 64, "detector": 16}[self.method]

    def train_threshold(self) -> float:
        if self.mask_threshold_train is not None:
            return self.mask_threshold_train
        return 0.5 if self.method == "labnet" else 0.9

    def validate(self, recipe: Any) -> None:
        """Cross-key checks of the deshadow section (and model.name = method)."""
        if recipe.model.name in METHODS or recipe.model.name == "deit_tiny_patch16_224":
            recipe.model.name = self.method
        elif recipe.model.name != self.method:
            raise RecipeError(f"model.name {recipe.model.name!r} must be one of {', '.join(METHODS)}")
        recipe.model.name = self.method
        if len(self.labnet_loss) != 3:
            raise RecipeError(
                "recipe key 'deshadow.labnet_loss' must be three weights [perceptual, grad, mse], "
                f"got {self.labnet_loss}"
            )
        if self.init == "identity" and self.method != "labnet":
            raise RecipeError("deshadow.init=identity exists for labnet only (SADC has no global residual)")
        if self.mask_noise > 0 and self.method == "detector":
            raise RecipeError("deshadow.mask_noise corrupts a remover's input mask: the detector has none")
        if self.method == "detector" and recipe.train.best_metric == "lab_mae_all":
            recipe.train.best_metric, recipe.train.best_mode = "ber", "min"
        c = self.resolved_channels()
        if c < 8 or c % 8:
            raise RecipeError(f"recipe key 'deshadow.channels' must be a multiple of 8 (>= 8), got {c}")
        if self.test_size is not None and len(self.test_size) != 2:
            raise RecipeError(f"recipe key 'deshadow.test_size' must be [width, height], got {self.test_size}")
        if recipe.data.img_size < 8:
            raise RecipeError(f"recipe key 'data.img_size' must be >= 8 for deshadow, got {recipe.data.img_size}")
        for key in ("ring_kernel", "sadc_morph"):
            if getattr(self, key) % 2 == 0:
                raise RecipeError(f"recipe key 'deshadow.{key}' must be odd, got {getattr(self, key)}")
