"""Overhead of one evcli engine training step over a hand-written PyTorch step on the same work, for a
one-optimizer method (part ``single``) and a two-optimizer method that owns its step (part ``gan``).

Both sides train the same timm architecture from the same initial weights on the same pre-made batch
with the same AdamW (lr, betas, eps, weight decay and decay / no-decay parameter groups):

* evcli: ``Trainer._train_step`` of the ``mix`` method with ``mix.method none`` (per-micro-batch RNG
  reseed, LR schedule, ``training_step`` under ``accelerator.autocast()``, ``accelerator.backward``,
  NaN/inf guard, optimizer step, zero_grad, method hooks), followed by ``ctx.step += 1`` as in
  ``Trainer.fit``.
* plain: forward, cross-entropy, backward, ``optimizer.step()``, ``optimizer.zero_grad()``.

The sides run in one process, interleaved in ABBA order (evcli, plain, plain, evcli, ...) after warm-up
steps of both, so that load from other processes and drift (clock boost, allocator growth) hit both
alike. Data loading is excluded from both: each step reads the same CPU batch (copied to the device
on both sides when the device is a GPU). The schedule is constant with no warm-up so that both sides
take the same lr; with equal work the two weight trajectories match, which the script checks.

Part ``gan``: a GAN-shaped method (conv generator G, conv discriminator D, a frozen teacher) stepping its
two SGD optimizers through ``ctx.step_optimizer`` (loss check, backward restricted to the optimizer's
parameters, step, zero_grad), against the plain twin doing the same forward passes, ``backward(inputs=...)``,
steps and zero_grads.

Usage::

    HF_HUB_OFFLINE=1 python bench/engine_overhead.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TARGET_RATIO = 1.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="deit_tiny_patch16_224", help="timm model name")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured warm-up steps per side")
    p.add_argument(
        "--block",
        type=int,
        default=1,
        help="consecutive steps of one side per timed block (on a GPU, >1 lets the plain side's queue run "
        "ahead between steps, exposing evcli's per-step NaN-guard sync)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--part", choices=["single", "gan", "all"], default="all")
    p.add_argument("--gan-img-size", type=int, default=64)
    p.add_argument("--gan-batch-size", type=int, default=16)
    p.add_argument("--out", default="bench/results/engine_overhead.json")
    args = p.parse_args(argv)
    if args.block < 1 or args.steps % args.block or args.warmup % args.block:
        p.error("--steps and --warmup must be multiples of --block (>= 1)")
    return args


def command_line() -> str:
    """The command as it was typed (relative script path; HF_HUB_OFFLINE kept since it changes behaviour)."""
    script = os.path.relpath(sys.argv[0]) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    env = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return env + "python " + shlex.join([script, *sys.argv[1:]])


def build_evcli(args: argparse.Namespace) -> Any:
    """A prepared Trainer of ``evcli mix`` (no run folder) with plain cross-entropy as the loss."""
    from evcli.engine.trainer import Trainer
    from evcli.recipe import resolve_recipe
    from evcli.registry import get_command

    recipe = resolve_recipe(
        "mix",
        flags={
            "mix.method": "none",
            # Smoothing would be identical work on both sides, but 0 keeps the plain loop the textbook one.
            "mix.label_smoothing": 0.0,
            "model.name": args.model,
            "model.patch_size": args.patch_size,
            "data.img_size": args.img_size,
            "data.batch_size": args.batch_size,
            "data.workers": 0,
            # Constant lr with no warm-up: both sides then apply the same update, so their weights stay
            # equal and the check below proves the work is the same. The schedule's cost per step is a few
            # float operations whatever its shape.
            "schedule.epochs": 1,
            "schedule.sched": "constant",
            "schedule.warmup": "0step",
        },
    )
    method = get_command("mix").load_method_class()(recipe)
    trainer = Trainer(recipe, method, run_dir=None)
    trainer._setup_training()
    return trainer


def build_plain(trainer: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same architecture with the evcli model's initial weights, and an identical AdamW."""
    from evcli.engine.method import decay_groups
    from evcli.models.timm_models import create_model

    r = trainer.recipe
    m = r.model
    model = create_model(
        m.name,
        num_classes=m.num_classes or len(trainer.ctx.classes),
        img_size=r.data.img_size,
        patch_size=m.patch_size,
        drop_rate=m.drop_rate,
        drop_path=m.drop_path,
        kwargs=m.kwargs,
    )
    model.load_state_dict(trainer.eval_modules().unwrap("model").state_dict())
    model.to(trainer.accelerator.device).train()
    o = r.optim
    optimizer = torch.optim.AdamW(
        decay_groups(model, o.weight_decay),
        lr=trainer.ctx.base_lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    return model, optimizer


def forever(batch: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same batch on every ``next``: data loading is not part of what is measured."""
    while True:
        yield batch


def interleaved(args: argparse.Namespace, sides: dict[str, Callable[[], torch.Tensor]], cuda: bool, device: Any):
    """Per-step median times of the sides, interleaved ABBA in blocks after warm-up, and their losses."""

    def timed(step: Callable[[], torch.Tensor], n: int) -> tuple[float, list[float]]:
        # Synchronize on both ends so that queued GPU work is charged to the block that made it.
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        block_losses = [step() for _ in range(n)]
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / n, [float(v.detach()) for v in block_losses]

    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    warmup_blocks = args.warmup // args.block
    for i in range(warmup_blocks + args.steps // args.block):
        # ABBA order: neither side always runs first (after the other's allocations / cache traffic).
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            dt, block_losses = timed(sides[name], args.block)
            losses[name].extend(block_losses)
            if i >= warmup_blocks:
                times[name].append(dt)  # per-step mean of the block
    return times, losses


def part_gan(args: argparse.Namespace) -> dict[str, Any]:
    """Two optimizers through ctx.step_optimizer against the plain twin (same nets, weights, batch, SGD)."""
    from evcli import api
    from evcli.engine.method import Frozen, OptimizerSpec, StepOutput
    from evcli.engine.trainer import Trainer
    from evcli.testing.toy import ToyGAN

    size, bs = args.gan_img_size, args.gan_batch_size

    def generator() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 3, 3, padding=1),
        )  # fmt: skip

    def discriminator() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 1, 3, padding=1),
        )  # fmt: skip

    class Images(torch.utils.data.Dataset):
        def __init__(self, n: int):
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(n, 3, size, size, generator=g)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
            i = key[1] if isinstance(key, tuple) else key
            return self.x[i], self.x[i].flip(-1)

    class BenchGAN(ToyGAN):
        def build_data(self, ctx: Any) -> Any:
            from evcli.testing.toy import VectorData

            return VectorData(Images(4 * bs), Images(bs), "random images")

        def build(self, ctx: Any) -> dict[str, Any]:
            teacher = generator().requires_grad_(False)
            return {"G": generator(), "D": discriminator(), "teacher": Frozen(teacher, "random")}

        def optimizers(self, modules: Any, ctx: Any) -> dict[str, OptimizerSpec]:
            return {n: OptimizerSpec(list(modules.unwrap(n).parameters())) for n in ("G", "D")}

        def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
            x, y = batch
            fake = modules.G(x)
            with torch.no_grad():
                soft = modules.teacher(x)
            loss_g = F.l1_loss(fake, y) + F.l1_loss(fake, soft) - 0.1 * modules.unwrap("D")(fake).mean()
            ctx.step_optimizer("G", loss_g)
            scores = modules.D(torch.cat([y, fake.detach()]))
            loss_d = F.softplus(-scores[: len(y)]).mean() + F.softplus(scores[len(y) :]).mean()
            ctx.step_optimizer("D", loss_d)
            return StepOutput(loss_g.detach() + loss_d.detach())

    recipe = api.resolve(
        "toy-gan",
        flags={"data.batch_size": bs, "schedule.sched": "constant", "schedule.epochs": 1, "optim.lr": 0.01},
    )
    trainer = Trainer(recipe, BenchGAN(recipe), run_dir=None)
    trainer._setup_training()
    device = trainer.accelerator.device
    cuda = device.type == "cuda"
    mods = trainer.eval_modules()
    plain = {n: (generator() if n != "D" else discriminator()) for n in ("G", "D", "teacher")}
    for n, m in plain.items():
        m.load_state_dict(mods.unwrap(n).state_dict())
        m.to(device).train()
    plain["teacher"].requires_grad_(False).eval()
    o = recipe.optim
    opts = {
        n: torch.optim.SGD(plain[n].parameters(), lr=trainer.named[n].base_lr, momentum=o.momentum,
                           weight_decay=o.weight_decay)
        for n in ("G", "D")
    }  # fmt: skip
    trainer.train_sampler.set_epoch(0)
    x_cpu, y_cpu = next(iter(trainer.train_loader))
    batches = forever((x_cpu, y_cpu))

    def evcli_step() -> torch.Tensor:
        out = trainer._train_step(batches)
        trainer.ctx.step += 1
        return out.loss

    def plain_step() -> torch.Tensor:
        x, y = x_cpu.to(device, non_blocking=True), y_cpu.to(device, non_blocking=True)
        g, d = plain["G"], plain["D"]
        fake = g(x)
        with torch.no_grad():
            soft = plain["teacher"](x)
        loss_g = F.l1_loss(fake, y) + F.l1_loss(fake, soft) - 0.1 * d(fake).mean()
        opts["G"].zero_grad(set_to_none=True)
        loss_g.backward(inputs=list(g.parameters()))
        opts["G"].step()
        opts["G"].zero_grad(set_to_none=True)
        scores = d(torch.cat([y, fake.detach()]))
        loss_d = F.softplus(-scores[: len(y)]).mean() + F.softplus(scores[len(y) :]).mean()
        opts["D"].zero_grad(set_to_none=True)
        loss_d.backward(inputs=list(d.parameters()))
        opts["D"].step()
        opts["D"].zero_grad(set_to_none=True)
        return loss_g.detach() + loss_d.detach()

    times, losses = interleaved(args, {"evcli": evcli_step, "plain": plain_step}, cuda, device)
    evcli_med, plain_med = statistics.median(times["evcli"]), statistics.median(times["plain"])
    return {
        "what": "two-optimizer method (owns its step) vs its plain PyTorch twin",
        "nets": f"conv G 3-64-64-3 and D 3-64-128-1 at {size}x{size}, batch {bs}, frozen teacher = G's architecture",
        "evcli_median_s": evcli_med,
        "plain_median_s": plain_med,
        "ratio": evcli_med / plain_med,
        "evcli_times_s": times["evcli"],
        "plain_times_s": times["plain"],
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["evcli"], losses["plain"], strict=True)),
        "target_ratio": TARGET_RATIO,
        "met": evcli_med / plain_med <= TARGET_RATIO,
        "notes": (
            "evcli side: Trainer._train_step of a method with owns_step (lr schedules of both optimizers, RNG "
            "reseed, send_to_device, autocast, training_step with two ctx.step_optimizer calls: loss finiteness "
            "check, accelerator.backward(inputs=the optimizer's parameters), step, zero_grad; interrupt-flag "
            "check, after_optimizer_step) plus ctx.step += 1. Plain side: the same forward passes, "
            "backward(inputs=...), SGD steps and zero_grads. Same initial weights, batch and SGD settings; "
            "constant lr, so the losses match step for step (max_abs_loss_diff)."
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {}
    if args.part in ("single", "all"):
        result.update(part_single(args))
    if args.part in ("gan", "all"):
        gan = part_gan(args)
        result["two_optimizers"] = gan
        print(
            f"engine_overhead (two optimizers): evcli {gan['evcli_median_s'] * 1e3:.1f} ms, plain "
            f"{gan['plain_median_s'] * 1e3:.1f} ms, ratio {gan['ratio']:.3f} (max loss diff "
            f"{gan['max_abs_loss_diff']:.2e})"
        )
    result["command"] = command_line()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"-> {out}")
    return 0


def part_single(args: argparse.Namespace) -> dict[str, Any]:
    trainer = build_evcli(args)
    device = trainer.accelerator.device
    cuda = device.type == "cuda"
    plain_model, plain_opt = build_plain(trainer)

    # One real (augmented) training batch, kept on the CPU like a loader's output.
    trainer.train_sampler.set_epoch(0)
    x_cpu, y_cpu = next(iter(trainer.train_loader))
    batches = forever((x_cpu, y_cpu))
    label_smoothing = trainer.recipe.method.label_smoothing

    def evcli_step() -> torch.Tensor:
        out = trainer._train_step(batches)
        trainer.ctx.step += 1  # the clock advances as in Trainer.fit
        return out.loss

    def plain_step() -> torch.Tensor:
        x, y = x_cpu.to(device, non_blocking=True), y_cpu.to(device, non_blocking=True)
        loss = F.cross_entropy(plain_model(x), y, label_smoothing=label_smoothing)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return loss

    times, losses = interleaved(args, {"evcli": evcli_step, "plain": plain_step}, cuda, device)

    # Equal work check: same weights, data, optimizer and lr give the same losses at every step.
    max_loss_diff = max(abs(a - b) for a, b in zip(losses["evcli"], losses["plain"], strict=True))
    evcli_med, plain_med = statistics.median(times["evcli"]), statistics.median(times["plain"])
    ratio = evcli_med / plain_med

    import accelerate
    import timm

    r = trainer.recipe
    result = {
        "benchmark": "engine_overhead: evcli Trainer._train_step vs a plain PyTorch training step",
        "command": command_line(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
        },
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "device": str(device),
        "model": r.model.name,
        "img_size": r.data.img_size,
        "patch_size": r.model.patch_size,
        "batch_size": r.data.batch_size,
        "mixed_precision": r.train.mixed_precision,
        "warmup_steps_per_side": args.warmup,
        "steps_per_side": args.steps,
        "block": args.block,
        "evcli_median_s": evcli_med,
        "plain_median_s": plain_med,
        "ratio": ratio,
        "evcli_times_s": times["evcli"],
        "plain_times_s": times["plain"],
        "evcli_min_s": min(times["evcli"]),
        "plain_min_s": min(times["plain"]),
        "max_abs_loss_diff": max_loss_diff,
        "target_ratio": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "notes": (
            "One process, sides interleaved in ABBA order in blocks of `block` steps (1: step by step) after "
            "warm-up steps of both; median over blocks of the per-step wall time (time.perf_counter; "
            "torch.cuda.synchronize at both ends of a block on a GPU). Same architecture, initial weights, "
            "batch, AdamW hyper-parameters and decay/no-decay groups on both sides; the loss is plain "
            "cross-entropy (mix.method none, label_smoothing 0). Included on the evcli side: all of "
            "Trainer._train_step (LR schedule apply, global RNG reseed, send_to_device, accelerator.autocast, "
            "training_step, accelerator.backward, NaN/inf guard with its .tolist() sync, after_backward, "
            "AcceleratedOptimizer step and zero_grad, after_optimizer_step) plus ctx.step += 1. Included on "
            "the plain side: .to(device) of the batch, forward, cross-entropy, backward, AdamW step, "
            "zero_grad(set_to_none=True). Excluded from both: data loading and augmentation (the same "
            "pre-made CPU batch is reused) and the per-step bookkeeping of Trainer.fit (loss window, progress "
            "bar, metrics.jsonl, eval, checkpoints). EMA and gradient clipping are off (recipe defaults), "
            "grad_accum 1, fp32; the schedule is constant without warm-up so both sides use the same lr, "
            "which makes their losses match step for step (max_abs_loss_diff)."
        ),
    }
    print(
        f"engine_overhead: {r.model.name} {r.data.img_size}px bs{r.data.batch_size} on {device}: "
        f"evcli {evcli_med * 1e3:.1f} ms, plain {plain_med * 1e3:.1f} ms, ratio {ratio:.3f} "
        f"(target <= {TARGET_RATIO}: {'met' if result['met'] else 'NOT met'}; "
        f"max loss diff {max_loss_diff:.2e})"
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
