"""Engine hooks of ``evcli coarse2fine``: CF-ViT training (CE on the fine output + KL from the coarse output to the
detached fine one), informative selection from ``selection_start`` on, and the engine-owned threshold sweep.

Training follows the paper's DeiT recipe: timm Mixup / CutMix on the fine batch first, the coarse input is the
bilinear (align_corners) resize of the *mixed* batch, the coarse head never sees the label. Evaluation runs both
stages on every image once and sums, for every eta of ``coarse2fine.sweep``, the correct answers, the exits and
the MACs (counted per stage by :mod:`evcli.ops.flops`), so that one pass gives the whole accuracy/FLOPs curve
and it reduces over processes like any other sum. ``method: dense`` is the baseline: the plain ViT of the same
size, trained with the same mix and loss on its fine output.

The model is a :class:`~evcli.methods.coarse2fine.model.CFViT` from ``build`` on (not a ``transform`` of the
plain ViT): evcli loads exported weights into what ``build`` makes, and a CF-ViT export holds tensors a plain
ViT has not (``pos_embed_coarse``, ``reuse.*``). A plain ViT's weights (``--init-from`` an ``evcli mix`` run,
``--weights`` / ``--pretrained``) are converted in :meth:`CoarseToFineMethod.adapt_weights`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evcli.console import log
from evcli.engine.method import StepOutput
from evcli.errors import UsageError
from evcli.methods.classifier import ClassifierMethod
from evcli.metrics.classification import classification_summary, classification_sums


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (timm's SoftTargetCrossEntropy), or hard labels."""
    if target.ndim == 1:
        return F.cross_entropy(logits.float(), target)
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def coarse_distillation(coarse_logits: torch.Tensor, fine_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(fine.detach()) || softmax(coarse)), batch mean (``KLDivLoss(reduction="batchmean")``)."""
    target = F.softmax(fine_logits.detach().float(), dim=-1)
    return F.kl_div(F.log_softmax(coarse_logits.float(), dim=-1), target, reduction="batchmean")


def cfvit_loss(
    coarse_logits: torch.Tensor, fine_logits: torch.Tensor, target: torch.Tensor, kl_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's loss: CE(fine, mixed target) + kl_weight * KL(fine.detach() || coarse); returns (loss, ce, kl)."""
    ce = soft_ce(fine_logits, target)
    kl = coarse_distillation(coarse_logits, fine_logits)
    return ce + kl_weight * kl, ce, kl


def sweep_key(eta: float) -> str:
    """Metric-name suffix of one threshold: ``0.9`` -> ``eta0.9``."""
    return f"eta{eta:g}"


def exit_mask(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``(T, B)``: image b exits at the coarse stage under threshold t (max softmax >= t, never for t >= 1)."""
    return (confidence.unsqueeze(0) >= thresholds.unsqueeze(1)) & (thresholds.unsqueeze(1) < 1.0)


class CoarseToFineMethod(ClassifierMethod):
    """CF-ViT (``method: cfvit``) or its plain-ViT baseline (``method: dense``) on the classifier base."""

    def __init__(self, recipe: Any):
        super().__init__(recipe)
        self.dense = self.cfg.method == "dense"
        self.label_smoothing = self.cfg.label_smoothing
        self.mixer: Any = None
        self.macs: dict[str, int] | None = None
        self.last_summary: dict[int, dict[str, float]] = {}
        self._eval_model: int | None = None
        self.thresholds = sorted(set(self.cfg.sweep) | {self.cfg.threshold})
        if not self.dense:
            self.onnx_input_shape = None  # early exit is data-dependent control flow: no ONNX graph of it

    # --- building -------------------------------------------------------------------------------

    def coarse_grid(self, patch: int) -> int:
        """c: the recipe's, else the input size over twice the patch size."""
        img = self.recipe.data.img_size
        c = self.cfg.coarse_grid
        if c is None:
            if img % (2 * patch) or img // (2 * patch) < 2:
                raise UsageError(
                    f"image size {img} cannot be split into a coarse grid: CF-ViT needs a multiple of twice the "
                    f"patch size ({2 * patch} px) of at least {4 * patch} px",
                    hint=f"use --img-size {max(4 * patch, img // (2 * patch) * 2 * patch)}, or --coarse-grid",
                )
            return img // (2 * patch)
        if img != 2 * c * patch:
            raise UsageError(
                f"image size {img} does not fit a coarse grid of {c}: the fine stage runs at 2 x {c} x {patch} px "
                f"patches = {2 * c * patch} px",
                hint=f"use --img-size {2 * c * patch}"
                + (f", or --coarse-grid {img // (2 * patch)}" if img % (2 * patch) == 0 and img >= 4 * patch else ""),
            )
        return c

    def build(self, ctx: Any) -> dict[str, nn.Module]:
        from evcli.methods.coarse2fine.model import CFViT, check_plain_vit

        c = self.cfg
        vit = super().build(ctx)["model"]
        check_plain_vit(vit, self.recipe.model.name)
        if c.mix_prob > 0 and (c.mixup_alpha > 0 or c.cutmix_alpha > 0):
            from timm.data import Mixup

            self.mixer = Mixup(
                mixup_alpha=c.mixup_alpha,
                cutmix_alpha=c.cutmix_alpha,
                prob=c.mix_prob,
                switch_prob=c.switch_prob,
                mode="batch",
                label_smoothing=c.label_smoothing,
                num_classes=self.num_classes(ctx),
            )
        if self.dense:
            return {"model": vit}
        grid = self.coarse_grid(vit.patch_embed.patch_size[0])
        model = CFViT(vit, grid, c.alpha, c.beta, c.attn_from_block, c.threshold, name=self.recipe.model.name)
        return {"model": model}

    def adapt_weights(self, state: dict[str, torch.Tensor], module: nn.Module) -> tuple[dict, list[str]]:
        """A plain ViT's weights become a CF-ViT's: the fine ``pos_embed`` resampled to the fine grid if needed,
        ``pos_embed_coarse`` resampled from it to the coarse grid, the reuse block freshly initialised; a CF-ViT's
        weights into the dense baseline drop the CF-ViT-only tensors. Head and patch embedding as the classifier
        base adapts them."""
        from timm.layers import resample_abs_pos_embed

        from evcli.methods.coarse2fine.model import CFViT

        notes: list[str] = []
        if not isinstance(module, CFViT):
            extra = sorted(k for k in state if k == "pos_embed_coarse" or k.startswith("reuse."))
            if extra:
                state = {k: v for k, v in state.items() if k not in extra}
                notes.append(f"CF-ViT weights into the dense ViT: {len(extra)} CF-ViT-only tensors left out")
            state, more = super().adapt_weights(state, module)
            return state, notes + more
        plain = "pos_embed_coarse" not in state and "pos_embed" in state
        state, more = super().adapt_weights(state, module)
        notes += more
        own = module.state_dict()
        if plain:
            pos = state["pos_embed"]
            state["pos_embed_coarse"] = resample_abs_pos_embed(
                pos, new_size=[module.coarse_grid] * 2, num_prefix_tokens=1
            )
            reuse = [k for k in own if k.startswith("reuse.")]
            for k in reuse:
                state[k] = own[k]
            notes.append(
                f"plain ViT -> CF-ViT: pos_embed_coarse resampled from pos_embed to the {module.coarse_grid}x"
                f"{module.coarse_grid} coarse grid, reuse block ({len(reuse)} tensors) freshly initialised"
            )
        elif (
            state.get("pos_embed_coarse") is not None
            and state["pos_embed_coarse"].shape != own["pos_embed_coarse"].shape
        ):
            old = list(state["pos_embed_coarse"].shape)
            state["pos_embed_coarse"] = resample_abs_pos_embed(
                state["pos_embed_coarse"], new_size=[module.coarse_grid] * 2, num_prefix_tokens=1
            )
            notes.append(f"pos_embed_coarse resampled {old} -> {list(own['pos_embed_coarse'].shape)}")
        return state, notes

    def transform(self, modules: dict[str, nn.Module], ctx: Any) -> None:
        if self.dense:
            return
        m = modules["model"]
        log(
            f"coarse2fine: CF-ViT, coarse {m.coarse_grid}x{m.coarse_grid} at {m.coarse_size} px, fine "
            f"{2 * m.coarse_grid}x{2 * m.coarse_grid} at {m.fine_size} px, K={m.num_informative} informative "
            f"patches -> {1 + 4 * m.num_informative + m.coarse_grid**2 - m.num_informative} fine tokens, "
            f"class attention from block {m.attn_from_block} (beta {m.beta}), threshold {m.threshold:g}"
        )

    def selection_start_step(self, ctx: Any) -> int:
        """The step from which the fine stage keeps only the informative patches."""
        return ctx.resolve(self.cfg.selection_start)

    # --- training -------------------------------------------------------------------------------

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        x, y = batch
        if self.mixer is not None:
            x, target = self.mixer(x, y)
        elif self.label_smoothing > 0:
            n = self.num_classes(ctx)
            target = F.one_hot(y, n).float() * (1 - self.label_smoothing) + self.label_smoothing / n
        else:
            target = y
        if self.dense:
            return StepOutput(soft_ce(modules.model(x), target))
        informative = ctx.step >= self.selection_start_step(ctx)
        logits_c, logits_f = modules.model(x, mode="both", informative=informative)
        loss, ce, kl = cfvit_loss(logits_c, logits_f, target, self.cfg.kl_weight)
        return StepOutput(
            loss,
            {"loss_ce": ce.detach(), "loss_kl": kl.detach(), "informative": torch.tensor(float(informative))},
        )

    # --- evaluation -----------------------------------------------------------------------------

    def stage_macs(self, model: nn.Module) -> dict[str, int]:
        """MACs per image of each stage (counted once: they depend on the architecture only)."""
        if self.macs is None:
            from evcli.ops.flops import counting

            if self.dense:
                size = self.recipe.data.img_size
                x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
                with counting(model) as c:
                    model(x)
                self.macs = {"coarse": 0, "fine": c.total, "total": c.total}
            else:
                from evcli.methods.coarse2fine.model import stage_macs

                self.macs = stage_macs(model)
        return self.macs

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        model = modules.unwrap("model")
        self._eval_model = id(model)
        macs = self.stage_macs(model)
        if self.dense:
            sums = classification_sums(model(x), y)
            sums["macs"] = sums["n"] * macs["total"]
            return sums
        logits_c, logits_f = model(x, mode="both", informative=True)
        sums = classification_sums(logits_f, y)
        correct_c = logits_c.argmax(1) == y
        correct_f = logits_f.argmax(1) == y
        confidence = logits_c.float().softmax(-1).amax(-1)
        t = torch.tensor(self.thresholds, device=x.device, dtype=confidence.dtype)
        exits = exit_mask(confidence, t)
        correct = torch.where(exits, correct_c.unsqueeze(0), correct_f.unsqueeze(0))
        n_exit = exits.sum(1).double()
        n = float(len(y))
        sums.update(
            {
                "top1_coarse": correct_c.sum(),
                "correct_at": correct.sum(1),
                "exits_at": n_exit,
                "macs_at": n_exit * macs["coarse"] + (n - n_exit) * macs["total"],
            }
        )
        return sums

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        metrics = classification_summary(sums)
        n = max(float(sums["n"]), 1.0)
        if self.dense:
            metrics["gflops"] = float(sums["macs"]) / n / 1e9
        else:
            metrics["top1_coarse"] = 100.0 * float(sums["top1_coarse"]) / n
            at = {
                eta: (float(sums["correct_at"][i]), float(sums["exits_at"][i]), float(sums["macs_at"][i]))
                for i, eta in enumerate(self.thresholds)
            }
            hit, out, macs = at[self.cfg.threshold]
            metrics.update({"top1_eta": 100.0 * hit / n, "exit_ratio": out / n, "gflops": macs / n / 1e9})
            for eta, (hit, out, macs) in at.items():
                k = sweep_key(eta)
                metrics[f"{k}/top1"] = 100.0 * hit / n
                metrics[f"{k}/exit_ratio"] = out / n
                metrics[f"{k}/gflops"] = macs / n / 1e9
        if self.macs is not None:
            metrics["gflops_coarse"] = self.macs["coarse"] / 1e9
            metrics["gflops_full"] = self.macs["total"] / 1e9
        if self._eval_model is not None:
            self.last_summary[self._eval_model] = metrics
        return metrics

    # --- the end --------------------------------------------------------------------------------

    def artifacts(self, modules: Any, out_dir: Any, ctx: Any) -> dict[str, str]:
        """The accuracy-vs-FLOPs curve of the last evaluation of these weights (``sweep.png``)."""
        if self.dense:
            return {}
        metrics = self.last_summary.get(id(modules.unwrap("model")))
        if not metrics:
            return {}
        from evcli.methods.coarse2fine.sweep import curve_from_metrics, plot_curve

        path = Path(out_dir) / "sweep.png"
        plot_curve(curve_from_metrics(metrics, self.thresholds), None, path, title=f"CF-ViT {self.recipe.model.name}")
        return {"sweep_plot": str(path)}

    def report_extras(self, ctx: Any) -> dict[str, Any]:
        from evcli.ops.flops import COUNTER

        extras: dict[str, Any] = {"flop_counter": COUNTER}
        if self.macs is not None:
            extras["gflops_per_image"] = {k: v / 1e9 for k, v in self.macs.items()}
        if not self.dense:
            extras["informative_selection_from_step"] = self.selection_start_step(ctx)
        return extras
