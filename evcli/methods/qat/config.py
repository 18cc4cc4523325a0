"""Recipe schema of ``evcli qat`` (the ``qat:`` section). Torch-free: loaded by --help and recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from evcli.durations import Duration
from evcli.registry import register_command


@register_command(
    "qat",
    implementation="evcli.methods.qat.method:QatMethod",
    help="Quantization-aware training at 2-8 bits: LSQ fake-quant layers, LTS weight freezing, integer export.",
    defaults={
        "model.name": "resnet18",
        "optim.name": "sgd",  # the weights; the quantizer step sizes have their own Adam (qat.quant_lr)
        "optim.lr_base": 0.01,  # fine-tuning from a full-precision model (LTS v2 ImageNet: 1e-2 at batch 256)
        "optim.lr_base_batch": 256,
        "optim.weight_decay": 1e-4,
        "optim.momentum": 0.9,
        "schedule.epochs": 4,
        "schedule.warmup": "0step",
        "schedule.min_lr": 0.0,
    },
)
@dataclass
class QatConfig:
    """Which quantizer, how many bits, on which layers; the LTS freezing schedule."""

    # lts: LSQ + Lottery Ticket Scratcher freezing; lsq: the LSQ baseline; fp32: the same training unquantized
    method: Literal["lts", "lsq", "fp32"] = "lts"
    bits: int = 4  # weights and activations of every quantized layer but the first and last
    weight_bits: int | None = None  # default: bits
    act_bits: int | None = None  # default: bits
    first_last_bits: int | None = 8  # first conv and classifier (weights and input); null: same as bits
    quantize_first_input: bool = True  # quantize the image input of the first layer (8-bit signed by default)
    weight_granularity: Literal["tensor", "channel"] = "tensor"  # one weight step per layer (LSQ) or per channel
    targets: list[str] = field(default_factory=list)  # layer patterns (default: every Conv2d/Linear)
    ignore: list[str] = field(default_factory=list)  # layers left in full precision
    quant_lr: float = 1e-4  # Adam learning rate of the step sizes (the reference code's lr_q)
    calibration_batches: int = 4  # training batches that initialise the activation step sizes
    # LTS (the card's names: distance_ema, warmup_epoch, fixed_mode, fixed_rate)
    lts_gamma: float = 0.99  # EMA factor γ of the distance to the quantization level (CIFAR 0.99, ImageNet 0.9999)
    lts_warmup: Duration = Duration("20%")  # steps before any weight may freeze
    lts_schedule: Literal["constant", "linear", "sine"] = "linear"  # ρ_t: fixing / linear-growth / sine-growth
    lts_rate: float = 0.1  # the constant schedule's ρ (threshold as a fraction of the level spacing)
    # fixed: the weight step stays at its initial value under LTS, so a frozen weight keeps its level (v2 code);
    # learned: the step keeps learning (v1 code: a frozen latent value can still change level)
    lts_weight_scale: Literal["fixed", "learned"] = "fixed"
    lts_freeze_last: bool = False  # the classifier may freeze too (v2 code: never)
    skip_frozen_grad: bool = True  # really skip the weight gradient of entirely frozen channels / layers
    keep_sparsity: bool = True  # keep the zeros of a sparse --init-from run (N:M or unstructured) through QAT
    label_smoothing: float = 0.0

    LIMITS: ClassVar[dict[str, str]] = {
        "bits": ">= 2, <= 8",
        "weight_bits": ">= 2, <= 8",
        "act_bits": ">= 2, <= 8",
        "first_last_bits": ">= 2, <= 8",
        "quant_lr": "> 0",
        "calibration_batches": ">= 1, <= 10000",
        "lts_gamma": "[0, 1)",
        "lts_warmup": ">= 0",
        "lts_rate": "[0, 1]",
        "label_smoothing": "[0, 1)",
    }

    def validate(self, recipe: Any) -> None:
        """Cross-key checks."""
        from evcli.methods.sparsify.config import check_pattern

        for i, p in enumerate(self.targets):
            check_pattern(p, f"qat.targets[{i}]")
        for i, p in enumerate(self.ignore):
            check_pattern(p, f"qat.ignore[{i}]")

    def resolved_bits(self) -> tuple[int, int, int]:
        """(weight bits, activation bits, first/last bits)."""
        w = self.weight_bits or self.bits
        a = self.act_bits or self.bits
        return w, a, self.first_last_bits or max(w, a)
