"""Engine hooks of ``evcli quant-sr``: full-precision SR training (``bits: 32``), and quantization-aware
fine-tuning with DDTB or PAMS distilled from a frozen full-precision teacher.

Phases (DDTB card, "Training procedure"), mapped onto the engine:

* ``build``: the student (quantizers in place, structure fixed) initialised from the teacher's weights, and the
  teacher as a frozen module (training only).
* ``calibrate`` (the paper's epoch 1): quantizers off, ``calib_batches`` batches, per-batch max / min of every
  activation quantizer; the top ``dynamic_ratio`` by var(max) + var(min) get their gate (``is_dynamic``
  buffer); then one forward on the first batch with the quantizers on, each setting its bounds from its
  input's M-th / (100 - M)-th percentile as it is reached (the paper's "first training forward").
* the loop: L = w_l1 L1(SR_q, HR) + w_at AT(F_q, F_fp) (+ w_gate mean MSE(gate logits, 0) during the gate
  warm-up, when the gates are computed but the bounds stay static). Two optimizers, ``weights`` (optim.lr) and
  ``bounds`` (``bound_lr``), both Adam with the step schedule.

The gate warm-up state is a pure function of the step clock and lives in buffers, so resume is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evcli.engine.method import Frozen, Method, OptimizerSpec, StepOutput
from evcli.errors import CheckpointError, UsageError
from evcli.recipe import Recipe

BOUND_SUFFIXES = (".upper", ".lower", ".alpha")


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Zagoruyko-Komodakis attention: L2-normalised, flattened channel mean of x^2 ([N, H*W])."""
    return F.normalize(x.pow(2).mean(1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention-transfer loss: mean squared difference of the attention maps."""
    return (attention_map(student) - attention_map(teacher)).pow(2).mean()


def collate_sr(samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack samples of one size; keep lists for evaluation batches of whole images of different sizes."""
    if all(s["hr"].shape == samples[0]["hr"].shape for s in samples):
        return {k: torch.stack([s[k] for s in samples]) for k in ("lr", "hr")}
    return {k: [s[k][None] for s in samples] for k in ("lr", "hr")}


def model_size(model: nn.Module, bits: int) -> dict[str, int]:
    """Bytes of the deployed model: quantized conv weights packed at ``bits`` (+ their two fp32 clip bounds),
    the gates of dynamic layers (2-bit weights, fp32 BN), every other parameter and the bounds in fp32; and the
    fp32 size of the same network without quantizers."""
    from evcli.methods.quant_sr.quantizers import DDTBActQuant, PAMSActQuant, QuantConv2d, packed_bits

    fp32 = 0
    packed = 0
    for _name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            fp32 += 4 * sum(p.numel() for p in m.parameters(recurse=False))
            packed += packed_bits(m.weight.numel(), bits) + 8 + (4 * m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, DDTBActQuant):
            packed += 8
            if bool(m.is_dynamic):
                g = m.gate
                packed += packed_bits(g.fc1.weight.numel() + g.fc2.weight.numel(), 2) + 8 * 2 * g.bn.num_features
        elif isinstance(m, PAMSActQuant):
            packed += 4
        elif not any(True for _ in m.children()) and not _inside_quantizer(model, _name):
            n = 4 * sum(p.numel() for p in m.parameters(recurse=False))
            fp32 += n
            packed += n
    return {"size_bytes": packed, "fp32_size_bytes": fp32}


def _inside_quantizer(model: nn.Module, name: str) -> bool:
    return ".quant_act" in f".{name}" or ".gate." in f".{name}."


class QuantSRMethod(Method):
    """Full-precision or quantized SR (modules: the trained ``model``; the frozen ``teacher`` when quantized)."""

    ddp_find_unused_parameters = True  # gates of non-dynamic quantizers never run

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.quantized = self.cfg.bits < 32
        self.calibration_batches = self.cfg.calib_batches if self.quantized else 0
        self.calibration: dict[str, Any] = {}
        self.teacher_source = ""

    # --- building -----------------------------------------------------------------------------

    def build_data(self, ctx: Any) -> Any:
        from evcli.data.sr import build_sr_data

        data = build_sr_data(self.recipe)
        data.collate_fn = collate_sr
        return data

    def build(self, ctx: Any) -> dict[str, nn.Module | Frozen]:
        from evcli.methods.quant_sr.models import build_sr_net

        model = build_sr_net(self.cfg)
        modules: dict[str, nn.Module | Frozen] = {"model": model}
        if ctx.training and self.quantized:
            teacher, state, self.teacher_source = self._teacher()
            teacher.requires_grad_(False)
            modules["teacher"] = Frozen(teacher.eval(), self.teacher_source)
            from evcli.io.checkpoint import load_model_weights

            # the student starts from the full-precision weights; its quantizer parameters from calibration
            load_model_weights(model, state, self.teacher_source, strict=False)
        return modules

    def _teacher(self) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
        from evcli import api
        from evcli.engine.run import resolve_weights_source
        from evcli.io.checkpoint import load_model_weights, read_metadata
        from evcli.methods.quant_sr.models import build_sr_net

        cfg = self.cfg
        if not cfg.teacher:
            raise UsageError(
                f"{cfg.bits}-bit training distils from, and starts from, a full-precision model: give --teacher",
                hint="train one first: evcli quant-sr train --bits 32 (then --teacher RUN_FOLDER)",
            )
        path = resolve_weights_source(cfg.teacher)
        if not path.exists():
            raise CheckpointError(f"teacher weights not found: {path}")
        meta = read_metadata(path, "teacher weights")
        saved = meta.get("recipe") or {}
        own = saved.get("quant-sr") if saved.get("command") == "quant-sr" else None
        if own is not None:
            if own.get("scale") != cfg.scale:
                raise UsageError(f"teacher {path} is a x{own.get('scale')} model, this run is x{cfg.scale}")
            if own.get("bits") != 32:
                raise UsageError(f"teacher {path} is a {own.get('bits')}-bit model; the teacher must be --bits 32")
        state, _ = api.plain_weights(path, "teacher weights")
        teacher = build_sr_net(cfg, bits=32)
        load_model_weights(teacher, state, str(path), strict=True)
        return teacher, state, str(path)

    def adapt_weights(
        self, state: dict[str, torch.Tensor], module: nn.Module
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Full-precision weights into a quantized network: quantizer parameters keep their initial values (the
        calibration sets them); exported integer codes are turned back into float weights."""
        from evcli.methods.quant_sr.quantizers import asym_dequantize

        notes = []
        own = module.state_dict()
        added = [
            k
            for k in own
            if k not in state and (".quant_act" in k or k.endswith(("w_low", "w_high", "weight_is_codes")))
        ]
        for k in added:
            state[k] = own[k]
        if added:
            notes.append(f"{len(added)} quantizer tensors not in the weights start from calibration")
        decoded = 0
        for k in [k for k in state if k.endswith("weight_is_codes")]:
            if bool(state[k]):
                base = k[: -len("weight_is_codes")]
                conv = module.get_submodule(base.rstrip("."))
                codes = state[base + "weight"].float()
                if conv.mode == "asym99":
                    w = asym_dequantize(codes, state[base + "w_low"], state[base + "w_high"], conv.bits)
                else:
                    levels = 2 ** (conv.bits - 1) - 1
                    w = (codes - levels) * (state[base + "w_high"].clamp_min(1e-8) / levels)
                state[base + "weight"], state[k] = w, torch.zeros((), dtype=torch.bool)
                decoded += 1
        if decoded:
            notes.append(f"{decoded} exported integer weight tensors de-quantized to start training")
        return state, notes

    @torch.no_grad()
    def calibrate(self, modules: Any, loader: Any, ctx: Any) -> None:
        from evcli.methods.quant_sr.quantizers import DDTBActQuant, dynamic_intensity, top_dynamic

        cfg = self.cfg
        model = modules.unwrap("model")
        quants = model.act_quantizers()
        for _, q in quants:
            q.observer, q.enabled.fill_(False)
        was_training = model.training
        model.eval()
        first = None
        for batch in loader:
            first = batch["lr"] if first is None else first
            model(batch["lr"])
        intensity = [dynamic_intensity(q.observer) for _, q in quants]
        chosen: list[str] = []
        if cfg.method == "ddtb":
            for i in top_dynamic(intensity, cfg.resolved_ratio()):
                quants[i][1].is_dynamic.fill_(True)
                chosen.append(quants[i][0])
        for _, q in quants:
            q.observer = None
            q.enabled.fill_(True)
            calibrate_bounds = cfg.bound_init == "all_bits" or cfg.bits == 2 or not isinstance(q, DDTBActQuant)
            q.pending_init = cfg.bound_percentile if calibrate_bounds else None
        if first is not None:
            model(first)  # each quantizer sets its bounds from its (already quantized upstream) input
        model.train(was_training)
        self.calibration = {
            "quantizers": len(quants),
            "dynamic": chosen,
            "intensity": {n: round(v, 6) for (n, _), v in zip(quants, intensity)},
            "bounds": {
                n: [round(float(q.lower), 4), round(float(q.upper), 4)]
                if isinstance(q, DDTBActQuant)
                else [round(-float(q.alpha), 4), round(float(q.alpha), 4)]
                for n, q in quants
            },
        }

    def optimizers(self, modules: Any, ctx: Any) -> dict[str, OptimizerSpec]:
        model = modules.unwrap("model")
        bounds = [p for n, p in model.named_parameters() if n.endswith(BOUND_SUFFIXES)]
        weights = [p for n, p in model.named_parameters() if not n.endswith(BOUND_SUFFIXES)]
        wd = self.recipe.optim.weight_decay
        specs = {"weights": OptimizerSpec([{"params": weights, "weight_decay": wd}])}
        if bounds:
            specs["bounds"] = OptimizerSpec([{"params": bounds, "weight_decay": 0.0}], lr=self.cfg.bound_lr)
        return specs

    # --- training -----------------------------------------------------------------------------

    def warmup_steps(self, ctx: Any) -> int:
        return ctx.resolve(self.cfg.gate_warmup)

    def set_gates(self, model: nn.Module, on: bool) -> list[nn.Module]:
        """Switch the dynamic quantizers' gates on (after the warm-up) or off; returns the dynamic quantizers."""
        from evcli.methods.quant_sr.quantizers import DDTBActQuant

        dynamic = [q for _, q in model.act_quantizers() if isinstance(q, DDTBActQuant) and bool(q.is_dynamic)]
        for q in dynamic:
            q.gate_on.fill_(on)
        return dynamic

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        cfg = self.cfg
        lr, hr = batch["lr"], batch["hr"]
        if not self.quantized:
            sr = modules.model(lr)
            l1 = F.l1_loss(sr * 255.0, hr * 255.0)
            return StepOutput(cfg.w_l1 * l1, {"l1": l1.detach()})
        warm = ctx.step < self.warmup_steps(ctx)
        dynamic = self.set_gates(modules.unwrap("model"), not warm)
        sr, feat = modules.model(lr, features=True)
        with torch.no_grad():
            _, t_feat = modules.teacher(lr, features=True)
        l1 = F.l1_loss(sr * 255.0, hr * 255.0)  # the papers' 0-255 pixel range
        at = at_loss(feat.float(), t_feat.float())
        loss = cfg.w_l1 * l1 + cfg.w_at * at
        logs = {"l1": l1.detach(), "at": at.detach()}
        if warm and dynamic and cfg.w_gate > 0:
            reg = torch.stack([q.last_logits.float().pow(2).mean() for q in dynamic]).mean()
            loss = loss + cfg.w_gate * reg
            logs["gate_reg"] = reg.detach()
        return StepOutput(loss, logs)

    # --- evaluation ---------------------------------------------------------------------------

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        from evcli.data.sr import bicubic_up
        from evcli.metrics.sr import psnr_y, ssim_y

        s = self.cfg.scale
        lrs, hrs = batch["lr"], batch["hr"]
        if isinstance(lrs, torch.Tensor):
            lrs, hrs = [lrs], [hrs]
        totals = torch.zeros(5, dtype=torch.float64, device=hrs[0].device)
        for lr, hr in zip(lrs, hrs):
            sr = modules.model(lr).float()
            bic = bicubic_up(lr.float(), s)
            totals += torch.stack(
                [
                    torch.tensor(float(len(hr)), dtype=torch.float64, device=totals.device),
                    psnr_y(sr, hr, s).sum(),
                    ssim_y(sr, hr, s).sum(),
                    psnr_y(bic, hr, s).sum(),
                    ssim_y(bic, hr, s).sum(),
                ]
            )
        return {"totals": totals}

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        n, p, ss, pb, sb = (float(v) for v in sums["totals"])
        n = max(n, 1.0)
        return {"psnr": p / n, "ssim": ss / n, "psnr_bicubic": pb / n, "ssim_bicubic": sb / n, "images": n}

    def model_metrics(self, modules: Any, ctx: Any) -> dict[str, float]:
        model = modules.unwrap("model")
        if not hasattr(model, "act_quantizers"):
            return {}
        size = model_size(model, self.cfg.bits if self.quantized else 32)
        return {"bits": float(self.cfg.bits), **{k: float(v) for k, v in size.items()}}

    # --- the end ------------------------------------------------------------------------------

    def export(self, modules: Any, ctx: Any) -> dict[str, torch.Tensor]:
        """Quantized convs as integer codes (uint8) with their clip range, flagged ``weight_is_codes``; bounds,
        gates and full-precision layers as they are."""
        model = modules.unwrap("model")
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not self.quantized:
            return state
        for name, conv in model.quant_convs():
            if bool(conv.weight_is_codes):
                state[f"{name}.weight"] = conv.weight.detach().round().to(torch.uint8)
                continue
            codes, low, high = conv.codes()
            state[f"{name}.weight"] = codes
            state[f"{name}.w_low"], state[f"{name}.w_high"] = low, high
            state[f"{name}.weight_is_codes"] = torch.ones((), dtype=torch.bool)
        return state

    @torch.no_grad()
    def artifacts(self, modules: Any, out_dir: Any, ctx: Any) -> dict[str, str]:
        """bicubic | fp32 teacher | this model | HR crops of the first val images (pictures/)."""

        folder = Path(out_dir) / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        data = next(iter(ctx.engine.val_sets().values()))
        model = modules.unwrap("model")
        was_training = model.training
        model.eval()
        try:
            self._pictures(modules, data, folder, ctx)
        finally:
            model.train(was_training)
        return {"pictures": str(folder)}

    def _pictures(self, modules: Any, data: Any, folder: Path, ctx: Any) -> None:
        from evcli.data.sr import bicubic_up
        from evcli.io.images import save_png

        s = self.cfg.scale
        for i in range(min(3, len(data))):
            sample = data[(0, i)]
            lr = sample["lr"][:, :64, :64].to(ctx.device)[None]
            hr = sample["hr"][:, : lr.shape[-2] * s, : lr.shape[-1] * s]
            panels = [bicubic_up(lr.float(), s)[0].cpu()]
            if "teacher" in modules:
                panels.append(modules.teacher(lr)[0].float().cpu())
            panels += [modules.unwrap("model")(lr)[0].float().cpu(), hr]
            gap = torch.ones(3, hr.shape[1], 4)
            row = []
            for p in panels:
                row += [p.clamp(0, 1), gap]
            name = (
                "bicubic_fp32_quantized_hr"
                if "teacher" in modules
                else ("bicubic_fp32_hr" if not self.quantized else "bicubic_quantized_hr")
            )
            save_png(torch.cat(row[:-1], dim=2), folder / f"val_{i}_{name}.png")

    def report_extras(self, ctx: Any) -> dict[str, Any]:
        cfg = self.cfg
        extras: dict[str, Any] = {
            "bits": cfg.bits,
            "scale": cfg.scale,
            "arch": cfg.arch,
            "quantizer": cfg.method if self.quantized else "none (full precision)",
            # the report's method: what this run trained (the ddtb default of --method is not used at --bits 32)
            "method": cfg.method if self.quantized else "fp32",
        }
        if self.quantized:
            extras["teacher"] = self.teacher_source
            extras["calibration"] = self.calibration
        modules = ctx.modules
        if modules is not None:
            extras["size"] = model_size(modules.unwrap("model"), cfg.bits if self.quantized else 32)
        return extras

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "teacher": self.teacher_source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calibration = dict(state.get("calibration") or {})
        self.teacher_source = self.teacher_source or str(state.get("teacher") or "")


class Bicubic(nn.Module):
    """The bicubic baseline as a module (no parameters)."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        from evcli.data.sr import bicubic_up

        return bicubic_up(lr, self.scale)


def evaluate_bicubic(recipe: Recipe) -> dict[str, Any]:
    """The bicubic baseline on the recipe's val sets, through the same loop and metrics as a trained model."""
    from evcli import api

    report = api.evaluate(recipe, None, method=QuantSRMethod(recipe), modules={"model": Bicubic(recipe.method.scale)})
    report["method"] = "bicubic"
    return report
