"""The training loop every method runs in: Accelerate processes, precision, accumulation, EMA,
step-keyed seeding, LR schedule, eval cadence, progress, metrics.jsonl, NaN guard, checkpoints.

Determinism: before every micro-batch the global torch / NumPy / Python RNGs are reseeded from
(seed, step, micro-batch, rank), and every sample's augmentation from (seed, epoch, index). The state
of a run at step k is therefore fully given by the checkpoint (weights, optimizer, EMA, method state,
step): resuming at k gives bit-identical weights to the uninterrupted run on CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evcli import __version__
from evcli.console import err_console, log, warn
from evcli.data.classification import ShardedBatchSampler, make_loader, mix_seed
from evcli.engine.method import Method, StepOutput
from evcli.engine.optim import LRSchedule
from evcli.errors import CheckpointError, DataError, HardwareError, Interrupted, TrainingDiverged
from evcli.io.checkpoint import (
    atomic_write,
    atomic_write_text,
    decode_state,
    encode_state,
    load_model_weights,
    model_weights_from,
    read_safetensors,
    save_safetensors,
    save_weights,
)
from evcli.recipe import Recipe, resolve_duration


@dataclass
class TrainContext:
    """What hooks see of the run: the accelerator, the recipe and the schedule clock."""

    accelerator: Any
    recipe: Recipe
    run_dir: Path | None
    num_classes: int = 0
    norm_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    norm_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    base_lr: float = 0.0
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_step: int = 0  # micro-batch within the current accumulation group
    steps_per_epoch: int = 1
    total_steps: int = 1
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # per-run objects a method wants to keep

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def resolve(self, duration: str) -> int:
        """Steps of a duration (``"10%"``, ``"5ep"``, ``"200step"``) in this run."""
        return resolve_duration(duration, self.steps_per_epoch, self.total_steps)


def _reseed_globals(seed: int) -> None:
    # torch.manual_seed would also (lazily) seed every accelerator backend, at ~0.2 ms a call on CPU;
    # seed the CPU generator, and CUDA only once it is in use.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def make_accelerator(recipe: Recipe, find_unused_parameters: bool = False) -> Any:
    """An Accelerator for the recipe's precision; refuses what the hardware cannot do.

    ``find_unused_parameters`` is passed to DDP for methods with parameters that some steps do not use
    (SMMix's token head on Mixup steps).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available() and not recipe.train.cpu
    mp = recipe.train.mixed_precision
    if mp == "fp16" and not cuda:
        raise HardwareError(
            "mixed_precision fp16 needs a CUDA device; none is available",
            hint="use --mixed-precision bf16 on CPU, or no",
        )
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state that refuses a second, different precision; a library user
    # may run several evcli jobs in one process (train fp32, then evaluate bf16). Reset it, keeping the
    # process group (PartialState) intact.
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mp:
        AcceleratorState._reset_state(reset_partial_state=False)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(cpu=not cuda, mixed_precision=mp, step_scheduler_with_optimizer=False, kwargs_handlers=handlers)


def norm_stats(recipe: Recipe) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input normalisation: the recipe's, else the model's pretrained config, else ImageNet's."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    try:
        import timm

        if timm.is_model(recipe.model.name):
            cfg = timm.models.get_pretrained_cfg(recipe.model.name)
            if cfg is not None:
                mean, std = tuple(cfg.mean), tuple(cfg.std)
    except Exception:  # a name timm does not know is reported when the model is built
        pass
    return tuple(recipe.data.mean or mean), tuple(recipe.data.std or std)


class Trainer:
    """Runs one method's training (or evaluation) in a run folder.

    Args:
        recipe: the resolved recipe.
        method: the method's hook object.
        run_dir: the run folder (written by rank 0); None for evaluation only.
        resume_from: a training checkpoint to continue from exactly.
    """

    def __init__(self, recipe: Recipe, method: Method, run_dir: Path | None, resume_from: Path | None = None):
        self.recipe = recipe
        self.method = method
        self.run_dir = run_dir
        self.resume_from = resume_from
        self.accelerator = make_accelerator(recipe, find_unused_parameters=method.ddp_find_unused_parameters)
        self.is_main = self.accelerator.is_main_process
        self.ctx = TrainContext(self.accelerator, recipe, run_dir)
        self.ctx.norm_mean, self.ctx.norm_std = norm_stats(recipe)
        self.best: dict[str, Any] = {}
        self.last_ckpt_step: int | None = None
        self._interrupt = False
        self.ema = None

    # ------------------------------------------------------------------------------------------
    # set-up

    def _build(self, for_training: bool) -> None:
        r, ctx = self.recipe, self.ctx
        torch.manual_seed(r.train.seed)  # same initial weights for a seed, whatever the process
        self.data = self.method.build_data(ctx)
        ctx.num_classes = self.data.num_classes
        self.model = self.method.build(ctx)
        self.world = self.accelerator.num_processes
        if not for_training:
            self.model = self.model.to(self.accelerator.device)
            return
        self.train_sampler = ShardedBatchSampler(
            len(self.data.train),
            r.data.batch_size,
            self.accelerator.process_index,
            self.world,
            r.train.seed,
            train=True,
        )
        batches = self.train_sampler.batches_per_epoch()
        if batches < r.train.grad_accum:
            raise DataError(
                f"the training set ({len(self.data.train)} images) is too small for batch size "
                f"{r.data.batch_size} x {self.world} process(es) x grad_accum {r.train.grad_accum}",
                hint="lower --batch-size or train.grad_accum",
            )
        ctx.steps_per_epoch = batches // r.train.grad_accum
        full = ctx.steps_per_epoch * r.schedule.epochs
        ctx.total_steps = min(full, r.schedule.max_steps) if r.schedule.max_steps else full
        global_batch = r.data.batch_size * self.world * r.train.grad_accum
        ctx.base_lr = r.optim.lr * (global_batch / r.optim.lr_base_batch if r.optim.lr_base_batch else 1.0)

    def _load_initial_weights(self) -> None:
        m = self.recipe.model
        for source, what in ((m.init_from, "init-from"), (m.weights, "weights file")):
            if not source:
                continue
            path = resolve_weights_source(source) if what == "init-from" else Path(source)
            tensors, meta = read_safetensors(path, what)
            target, state = weights_target(self.method, self.model, model_weights_from(tensors, meta))
            report = load_model_weights(target, state, str(path), strict=m.weights_strict)
            skipped = report["missing"] + report["unexpected"] + report["mismatched"]
            log(f"weights: loaded {path}" + (f" ({len(skipped)} keys did not fit and were skipped)" if skipped else ""))
            if skipped:
                warn("keys not loaded: " + ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))

    def _prepare(self) -> None:
        acc, ctx = self.accelerator, self.ctx
        self.optimizers = self.method.configure_optimizers(self.model, ctx)
        self.schedule = LRSchedule(self.recipe.schedule, ctx.base_lr, ctx.total_steps, ctx.steps_per_epoch)
        # Optimizer state is loaded before prepare(), which moves it to the device with the weights.
        ema_state = self._load_training_state(self.resume_from) if self.resume_from is not None else None
        prepared = acc.prepare(self.model, *self.optimizers)
        self.model, self.optimizers = prepared[0], list(prepared[1:])
        ctx.optimizers = self.optimizers
        if self.recipe.train.ema:
            from timm.utils import ModelEmaV3

            # built from the prepared model so that it lives on the same device
            self.ema = ModelEmaV3(self.unwrapped, decay=self.recipe.train.ema_decay)
            if ema_state is not None:
                load_model_weights(self.ema.module, ema_state, f"{self.resume_from} (EMA)", strict=True)
        workers, pin = self.recipe.data.workers, acc.device.type == "cuda"
        self.train_loader = make_loader(self.data.train, self.train_sampler, workers, pin)
        self.val_loader = self.make_val_loader()

    def make_val_loader(self) -> Any:
        r, acc = self.recipe, self.accelerator
        sampler = ShardedBatchSampler(
            len(self.data.val),
            r.data.eval_batch_size or 2 * r.data.batch_size,
            acc.process_index,
            acc.num_processes,
            r.train.seed,
            train=False,
        )
        return make_loader(self.data.val, sampler, r.data.workers, acc.device.type == "cuda")

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _state_tree(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in self.unwrapped.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        state = {
            "optimizers": [getattr(o, "optimizer", o).state_dict() for o in self.optimizers],
            "method": self.method.state_dict(),
        }
        skeleton = encode_state(state, "state", tensors)
        return tensors, skeleton

    def save_checkpoint(self, is_best: bool) -> None:
        """Write checkpoints/last.safetensors (and best) atomically on rank 0."""
        tensors, skeleton = self._state_tree()  # every rank: state_dict() may sync in some wrappers
        if self.is_main and self.run_dir is not None:
            ctx = self.ctx
            meta = {
                "kind": "training",
                "evcli_version": __version__,
                "torch_version": torch.__version__,
                "command": self.recipe.command,
                "model_name": self.recipe.model.name,
                "num_classes": ctx.num_classes,
                "classes": list(getattr(self.data, "classes", [])),
                "step": ctx.step,
                "epoch": ctx.epoch,
                "steps_per_epoch": ctx.steps_per_epoch,
                "total_steps": ctx.total_steps,
                "world_size": self.accelerator.num_processes,
                "best": self.best,
                "rng": {"scheme": "step-keyed", "seed": self.recipe.train.seed},
                "state": skeleton,
                "recipe": self.recipe.to_dict(),
            }
            ckdir = self.run_dir / "checkpoints"
            last = save_safetensors(ckdir / "last.safetensors", tensors, meta)
            if is_best:
                atomic_write(ckdir / "best.safetensors", lambda tmp: shutil.copyfile(last, tmp))
        self.last_ckpt_step = self.ctx.step
        self.accelerator.wait_for_everyone()

    def _load_training_state(self, path: Path) -> dict[str, torch.Tensor] | None:
        """Restore weights, optimizers, method state and the clock; returns the EMA weights, if any."""
        tensors, meta = read_safetensors(path, "checkpoint")
        if meta.get("kind") != "training":
            raise CheckpointError(f"{path} is not an evcli training checkpoint")
        load_model_weights(self.model, model_weights_from(tensors, meta), str(path), strict=True)
        ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
        if self.recipe.train.ema and ema_state is None:
            raise CheckpointError(f"{path} has no EMA weights but the recipe has train.ema: true")
        state = decode_state(meta["state"], tensors)
        if len(state["optimizers"]) != len(self.optimizers):
            raise CheckpointError(
                f"{path} holds {len(state['optimizers'])} optimizer states, expected {len(self.optimizers)}"
            )
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self.method.load_state_dict(state["method"])
        self.ctx.step = int(meta["step"])
        self.best = meta.get("best", {})
        self.last_ckpt_step = self.ctx.step
        if meta.get("world_size", 1) != self.accelerator.num_processes:
            warn(
                f"resuming a {meta.get('world_size')}-process run with {self.accelerator.num_processes} process(es): "
                "data order and results will differ from the uninterrupted run"
            )
        return ema_state

    # ------------------------------------------------------------------------------------------
    # the loop

    def _install_sigint(self) -> Any:
        if not hasattr(signal, "SIGINT"):
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._interrupt:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._interrupt = True
            warn("interrupt received: finishing this step and saving a checkpoint (Ctrl-C again to stop now)")

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            return None

    def _check_step(self, loss_sum: torch.Tensor) -> None:
        """NaN/inf guard and interrupt flag, agreed over all processes (one tiny reduce per step)."""
        flags = torch.stack(
            [
                (~torch.isfinite(loss_sum.detach().float())).float(),
                torch.tensor(float(self._interrupt), device=loss_sum.device),
            ]
        )
        if self.world > 1:
            flags = self.accelerator.reduce(flags, "sum")
        bad, interrupted = flags.tolist()
        if bad:
            where = (
                f"{self.run_dir / 'checkpoints' / 'last.safetensors'} (step {self.last_ckpt_step})"
                if self.last_ckpt_step is not None and self.run_dir
                else "none was written yet"
            )
            raise TrainingDiverged(
                f"loss became {'nan' if math.isnan(loss_sum.item()) else 'inf'} at step {self.ctx.step + 1} "
                f"(epoch {self.ctx.epoch}); the weights were not updated. Last good checkpoint: {where}",
                hint="lower the learning rate (--lr), enable optim.clip_grad, or check the data",
            )
        self._interrupt = bool(interrupted)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.is_main and self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop metric records the killed run wrote after its last checkpoint."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if not self.is_main or path is None or not path.exists():
            return
        keep = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def _due(self, every: int) -> bool:
        return every > 0 and self.ctx.step % every == 0

    def _evaluate(self) -> dict[str, float]:
        metrics = self.method.evaluate(self.unwrapped, self.val_loader, self.ctx)
        if self.ema is not None:
            ema_metrics = self.method.evaluate(self.ema.module, self.val_loader, self.ctx)
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        return metrics

    def fit(self, on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train to the end of the schedule, evaluate, export; returns the report.

        Args:
            on_ready: called once everything is built, before the first step (creates the run folder).
        """
        self._build(for_training=True)
        if self.resume_from is None:
            self._load_initial_weights()
        self._prepare()
        if on_ready is not None:
            on_ready()
        r, ctx, acc = self.recipe, self.ctx, self.accelerator
        if self.resume_from is not None:
            self._trim_metrics(ctx.step)
            log(f"resume: step {ctx.step}/{ctx.total_steps} from {self.resume_from}")
        eval_every = ctx.resolve(r.train.eval_every)
        ckpt_every = ctx.resolve(r.train.ckpt_every) if r.train.ckpt_every else eval_every
        n_params = sum(p.numel() for p in self.unwrapped.parameters())
        log(f"data: {self.data.description}")
        log(
            f"model: {r.model.name}, {n_params / 1e6:.2f}M parameters; {acc.num_processes} process(es) on "
            f"{acc.device.type}; {ctx.total_steps} steps ({ctx.steps_per_epoch}/epoch), global batch "
            f"{r.data.batch_size * acc.num_processes * r.train.grad_accum}, lr {ctx.base_lr:.3g}"
        )
        previous_handler = self._install_sigint()
        progress = _Progress(ctx.total_steps, enabled=self.is_main)
        t_start, seen, window = time.perf_counter(), 0, []
        metrics: dict[str, float] = {}
        try:
            with progress:
                progress.advance_to(ctx.step)
                while ctx.step < ctx.total_steps:
                    ctx.epoch = ctx.step // ctx.steps_per_epoch
                    in_epoch = ctx.step % ctx.steps_per_epoch
                    if in_epoch == 0:
                        self.method.on_epoch_start(ctx.epoch, ctx)
                    self.train_sampler.set_epoch(ctx.epoch, start_batch=in_epoch * r.train.grad_accum)
                    batches = iter(self.train_loader)
                    steps_left = min(ctx.steps_per_epoch - in_epoch, ctx.total_steps - ctx.step)
                    for _ in range(steps_left):
                        out = self._train_step(batches)
                        seen += r.data.batch_size * r.train.grad_accum * acc.num_processes
                        window.append(out.loss.detach())
                        ctx.step += 1
                        end_of_epoch = ctx.step % ctx.steps_per_epoch == 0
                        if end_of_epoch:
                            self.method.on_epoch_end(ctx.epoch, ctx)
                        progress.advance_to(ctx.step, loss=out.loss)
                        if self._due(r.train.log_every) or ctx.step == ctx.total_steps:
                            loss = torch.stack(window).float().mean().item()
                            window = []
                            rec = {
                                "step": ctx.step,
                                "epoch": ctx.epoch,
                                "loss": loss,
                                "lr": self.optimizers[0].param_groups[0]["lr"],
                                "img_per_s": seen / max(time.perf_counter() - t_start, 1e-9),
                            }
                            rec.update({k: float(v) for k, v in out.logs.items()})
                            self._write_metrics(rec)
                            progress.note(
                                f"step {ctx.step}/{ctx.total_steps} epoch {ctx.epoch} loss {loss:.4f} "
                                f"lr {rec['lr']:.3g} {rec['img_per_s']:.1f} img/s"
                            )
                        evaluated = False
                        if self._due(eval_every) or ctx.step == ctx.total_steps:
                            metrics = self._evaluate()
                            self._write_metrics({"step": ctx.step, "epoch": ctx.epoch, "split": "val", **metrics})
                            progress.note(
                                f"eval step {ctx.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                            )
                            evaluated = True
                        is_best = evaluated and self._update_best(metrics)
                        if evaluated or self._due(ckpt_every) or self._interrupt:
                            self.save_checkpoint(is_best)
                        if self._interrupt:
                            raise Interrupted(
                                f"interrupted at step {ctx.step}; checkpoint saved",
                                hint=f"continue with: --resume {self.run_dir}",
                            )
        except KeyboardInterrupt as exc:
            raise Interrupted(
                f"interrupted at step {ctx.step}"
                + (f"; last checkpoint at step {self.last_ckpt_step}" if self.last_ckpt_step is not None else ""),
                hint=f"continue with: --resume {self.run_dir}" if self.last_ckpt_step is not None else None,
            ) from exc
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if not metrics:  # resumed at the very end: evaluate once more for the report
            metrics = self._evaluate()
        return self._finish(metrics, time.perf_counter() - t_start, seen)

    def _train_step(self, batches: Any) -> StepOutput:
        from accelerate.utils import send_to_device

        r, ctx, acc = self.recipe, self.ctx, self.accelerator
        for opt in self.optimizers:
            self.schedule.apply(opt, ctx.step)
        accum = r.train.grad_accum
        total_loss = None
        out: StepOutput | None = None
        for micro in range(accum):
            ctx.micro_step = micro
            _reseed_globals(mix_seed(r.train.seed, ctx.step, micro, acc.process_index, 0x7E))
            batch = send_to_device(next(batches), acc.device, non_blocking=True)
            if self.method.owns_step:
                out = self.method.training_step(self.model, batch, ctx)
            else:
                sync = micro == accum - 1 or self.world == 1
                with nullcontext() if sync else acc.no_sync(self.model):
                    with acc.autocast():
                        out = self.method.training_step(self.model, batch, ctx)
                    acc.backward(out.loss / accum if accum > 1 else out.loss)
            loss = out.loss.detach()
            total_loss = loss if total_loss is None else total_loss + loss
        self._check_step(total_loss)
        if not self.method.owns_step:
            self.method.after_backward(self.model, ctx)
            if r.optim.clip_grad:
                acc.clip_grad_norm_(self.model.parameters(), r.optim.clip_grad)
            for opt in self.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        ctx.micro_step = 0
        self.method.after_optimizer_step(self.model, ctx)
        if self.ema is not None:
            self.ema.update(self.unwrapped, step=ctx.step)
        assert out is not None
        out.loss = total_loss / accum
        return out

    def _update_best(self, metrics: dict[str, float]) -> bool:
        key, mode = self.recipe.train.best_metric, self.recipe.train.best_mode
        if key not in metrics:
            return False
        previous = self.best.get(key)
        if previous is None or (metrics[key] > previous if mode == "max" else metrics[key] < previous):
            self.best = {"step": self.ctx.step, **metrics}
            return True
        return False

    # ------------------------------------------------------------------------------------------
    # the end

    def _finish(self, metrics: dict[str, float], seconds: float, seen: int) -> dict[str, Any]:
        ctx, r = self.ctx, self.recipe
        exported = self.method.export(self.unwrapped, ctx)
        files: dict[str, str] = {}
        report: dict[str, Any] = {}
        if self.is_main and self.run_dir is not None:
            meta = {
                "evcli_version": __version__,
                "command": r.command,
                "model_name": r.model.name,
                "num_classes": ctx.num_classes,
                "classes": list(getattr(self.data, "classes", [])),
                "step": ctx.step,
                "metrics": metrics,
                "recipe": r.to_dict(),
            }
            files["weights"] = str(save_weights(self.run_dir / "final.safetensors", exported, meta))
            if self.ema is not None:
                ema_weights = self.method.export(self.ema.module, ctx)
                files["ema_weights"] = str(save_weights(self.run_dir / "final_ema.safetensors", ema_weights, meta))
            files["last_checkpoint"] = str(self.run_dir / "checkpoints" / "last.safetensors")
            if (self.run_dir / "checkpoints" / "best.safetensors").exists():
                files["best_checkpoint"] = str(self.run_dir / "checkpoints" / "best.safetensors")
            files["metrics"] = str(self.run_dir / "metrics.jsonl")
            report = {
                "command": r.command,
                "method": getattr(r.method, "method", r.command),
                "model": r.model.name,
                "parameters": sum(p.numel() for p in exported.values() if p.is_floating_point()),
                "data": self.data.description,
                "processes": self.accelerator.num_processes,
                "device": self.accelerator.device.type,
                "steps": ctx.step,
                "epochs": ctx.step / ctx.steps_per_epoch,
                "metrics": metrics,
                "best": self.best,
                "train_seconds_this_session": round(seconds, 3),
                "img_per_s": round(seen / seconds, 2) if seconds > 0 else None,
                "run_dir": str(self.run_dir),
                "files": files,
            }
            atomic_write_text(self.run_dir / "report.json", json.dumps(report, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return report

    def evaluate_only(self, weights: Path, strict: bool = True) -> dict[str, Any]:
        """Build the model, load ``weights`` and evaluate it on the val data."""
        self._build(for_training=False)
        tensors, meta = read_safetensors(weights, "weights file")
        target, state = weights_target(self.method, self.model, model_weights_from(tensors, meta))
        load_model_weights(target, state, str(weights), strict=strict)
        self.val_loader = self.make_val_loader()
        metrics = self.method.evaluate(self.model, self.val_loader, self.ctx)
        return {
            "command": self.recipe.command,
            "model": self.recipe.model.name,
            "weights": str(weights),
            "data": self.data.description,
            "metrics": metrics,
        }

    def export_only(self, checkpoint: Path, output: Path) -> dict[str, Any]:
        """Rebuild the model of a training checkpoint, restore it and write the method's export."""
        tensors, meta = read_safetensors(checkpoint, "checkpoint")
        self.ctx.num_classes = int(meta["num_classes"])
        torch.manual_seed(self.recipe.train.seed)
        model = self.method.build(self.ctx)
        load_model_weights(model, model_weights_from(tensors, meta), str(checkpoint), strict=True)
        state = decode_state(meta["state"], tensors)
        self.method.load_state_dict(state["method"])
        self.ctx.step = int(meta["step"])
        exported = self.method.export(model, self.ctx)
        out_meta = {
            "evcli_version": __version__,
            "command": self.recipe.command,
            "model_name": self.recipe.model.name,
            "num_classes": self.ctx.num_classes,
            "classes": meta.get("classes", []),
            "step": self.ctx.step,
            "metrics": meta.get("best", {}),
            "recipe": self.recipe.to_dict(),
        }
        path = save_weights(output, exported, out_meta)
        return {"checkpoint": str(checkpoint), "step": self.ctx.step, "weights": str(path), "tensors": len(exported)}


def weights_target(
    method: Method, model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Where user weights go: the method's ``weights_target`` (e.g. the backbone inside a train-time
    wrapper). Weights saved from the whole wrapper (a training checkpoint) are narrowed to it."""
    target = method.weights_target(model)
    if target is model:
        return model, state
    prefix = next(name for name, module in model.named_modules() if module is target) + "."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return target, state


def resolve_weights_source(source: str | Path) -> Path:
    """A run folder's exported weights (else its best, else last checkpoint), or a file as given."""
    p = Path(source).expanduser()
    if p.is_dir():
        for candidate in (
            p / "final.safetensors",
            p / "checkpoints" / "best.safetensors",
            p / "checkpoints" / "last.safetensors",
        ):
            if candidate.exists():
                return candidate
        raise CheckpointError(f"no weights in run folder {p} (no final.safetensors or checkpoints/)")
    return p


class _Progress:
    """A rich progress bar on rank 0 when stderr is a terminal; plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty() and os.environ.get("EVCLI_NO_PROGRESS") != "1":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, loss="")

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance_to(self, step: int, loss: torch.Tensor | None = None) -> None:
        if self.bar is not None:
            fields = {"loss": f"loss {loss.item():.4f}"} if loss is not None else {}
            self.bar.update(self.task, completed=step, **fields)

    def note(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            log(line)
