"""Toy methods that exercise the engine contract in tests: two optimizers with a frozen teacher (a GAN-shaped
step the method owns), and a quantizer swap whose step size comes from calibration.

Importing this module registers the commands ``toy-gan`` and ``toy-quant``; their recipes replace the common
``data`` section with a typed one of their own (no image size: the samples are vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from evcli.engine.method import Frozen, Method, OptimizerSpec, StepOutput
from evcli.registry import register_command

DIM = 8


@dataclass
class VectorDataConfig:
    """Synthetic vectors: the data section of the toy commands (what the engine needs of any data section)."""

    path: str | None = None  # unused: always synthetic
    samples: int = 64
    batch_size: int = 4
    eval_batch_size: int | None = None
    workers: int = 0


@dataclass
class ToyConfig:
    """Settings of the toy methods."""

    method: str = "toy"
    adv_weight: float = 0.1
    nan_at_step: int = -1  # make the loss NaN at this step (tests of the guard)
    calibration_batches: int = 2
    val_b_samples: int = 8  # size of val set "b" (1 with 2 processes: a rank sees no val batch of it)


register_command(
    "toy-gan",
    "evcli.testing.toy:ToyGAN",
    help="Two optimizers (G, D) and a frozen teacher (engine tests).",
    defaults={"model.name": "toy", "optim.name": "sgd", "optim.lr": 0.05, "schedule.epochs": 2},
    sections={"data": VectorDataConfig},
)(ToyConfig)
register_command(
    "toy-quant",
    "evcli.testing.toy:ToyQuant",
    help="A quantizer swap calibrated from data (engine tests).",
    defaults={"model.name": "toy", "optim.name": "adam", "optim.lr": 0.01, "schedule.epochs": 2},
    sections={"data": VectorDataConfig},
)(ToyConfig)


class VectorDataset(Dataset):
    """Deterministic vectors x and targets y = tanh(A x), indexed by (epoch, index)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        a = torch.randn(DIM, DIM, generator=g) / DIM**0.5
        self.y = torch.tanh(self.x @ a)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        _, i = key if isinstance(key, tuple) else (0, key)
        return self.x[i], self.y[i]


@dataclass
class VectorData:
    train: Dataset
    val: Any
    description: str


class _ToyBase(Method):
    def build_data(self, ctx: Any) -> VectorData:
        n = self.recipe.data.samples
        return VectorData(
            VectorDataset(n, 1),
            {"a": VectorDataset(12, 2), "b": VectorDataset(self.cfg.val_b_samples, 3)},
            f"{n} synthetic vectors",
        )

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        out = modules[self.weights_module](x)
        return {"sq": ((out - y) ** 2).sum(), "n": torch.tensor(float(y.numel()), device=y.device)}

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        return {"mse": float(sums["sq"] / sums["n"])}

    def tables(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, Any]:
        return {"counts": {"values": int(sums["n"])}}  # summed over the set (and processes)


class ToyGAN(_ToyBase):
    """G maps x to y (L2 to a frozen teacher plus an adversarial term through D); D tells real from fake. The
    method owns its step: G then D, each through ``ctx.step_optimizer``. Every gradient each optimizer is about
    to apply is recorded in ``grad_log`` (tests compare them across processes)."""

    owns_step = True
    weights_module = "G"

    def __init__(self, recipe: Any):
        super().__init__(recipe)
        self.grad_log: list[dict[str, Any]] = []
        self.local_losses: list[float] = []
        self.frozen_teacher_grad = True  # tests flip it to break the contract

    def build(self, ctx: Any) -> dict[str, Any]:
        teacher = nn.Linear(DIM, DIM)
        teacher.requires_grad_(not self.frozen_teacher_grad)
        return {
            "G": nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM)),
            "D": nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 1)),
            "teacher": Frozen(teacher, "random init (test)"),
        }

    def optimizers(self, modules: Any, ctx: Any) -> dict[str, OptimizerSpec]:
        self._params = {name: list(modules.unwrap(name).parameters()) for name in ("G", "D")}
        return {name: OptimizerSpec(params) for name, params in self._params.items()}

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        x, y = batch
        fake = modules.G(x)
        with torch.no_grad():
            soft = modules.teacher(x)
        loss_g = nn.functional.mse_loss(fake, y) + 0.1 * nn.functional.mse_loss(fake, soft)
        loss_g = loss_g - self.cfg.adv_weight * modules.unwrap("D")(fake).mean()  # D as a fixed function
        if ctx.step == self.cfg.nan_at_step:
            loss_g = loss_g * float("nan")
        self._hook(ctx, "G")
        ctx.step_optimizer("G", loss_g)
        scores = modules.D(torch.cat([y, fake.detach()]))  # one call per backward under DDP
        real, fake_s = scores[: len(y)], scores[len(y) :]
        loss_d = nn.functional.softplus(-real).mean() + nn.functional.softplus(fake_s).mean()
        self._hook(ctx, "D")
        ctx.step_optimizer("D", loss_d)
        self.local_losses.append(float(loss_g.detach()))
        return StepOutput(loss_g.detach() + loss_d.detach(), {"loss_g": loss_g.detach(), "loss_d": loss_d.detach()})

    def _hook(self, ctx: Any, name: str) -> None:
        """Record the gradients of optimizer ``name`` right before it steps (a one-shot step pre-hook)."""
        opt = ctx.engine.named[name].optimizer
        inner = getattr(opt, "optimizer", opt)

        def pre(optimizer: Any, args: Any, kwargs: Any) -> None:
            grads = [p.grad.detach().flatten().tolist() if p.grad is not None else None for p in self._params[name]]
            self.grad_log.append({"step": ctx.step, "optimizer": name, "grads": grads})
            handle.remove()

        handle = inner.register_step_pre_hook(pre)


class QuantLinear(nn.Module):
    """A linear layer whose input is fake-quantized to 8 bits with a learned step size (LSQ-style)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.step_size = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step_size.abs() + 1e-8
        v = x / s
        q = v + (torch.clamp(torch.round(v), -128, 127) - v).detach()  # straight-through rounding
        return self.linear(q * s)


class ToyQuant(_ToyBase):
    """A Linear model whose first layer is swapped for :class:`QuantLinear` in ``transform``; ``calibrate`` sets
    the step size to max|x| / 127 over the calibration batches."""

    weights_module = "model"
    export_is_transformed = True  # the export holds the quantized layer's step size

    def __init__(self, recipe: Any):
        super().__init__(recipe)
        self.calibration_batches = self.cfg.calibration_batches
        self.calibrate_calls = 0
        self.calibrated_step: float | None = None

    def build(self, ctx: Any) -> dict[str, Any]:
        return {"model": nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM))}

    def transform(self, modules: dict[str, nn.Module], ctx: Any) -> None:
        modules["model"][0] = QuantLinear(modules["model"][0])

    def calibrate(self, modules: Any, loader: Any, ctx: Any) -> None:
        self.calibrate_calls += 1
        peak = max(float(x.abs().max()) for x, _ in loader)
        self.calibrated_step = peak / 127
        modules.unwrap("model")[0].step_size.fill_(self.calibrated_step)

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        x, y = batch
        loss = nn.functional.mse_loss(modules.model(x), y)
        if ctx.step == self.cfg.nan_at_step:
            loss = loss * float("nan")
        return StepOutput(loss)
