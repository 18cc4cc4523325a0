"""Engine hooks of ``evcli qat``: LSQ fake-quant training, the LTS freezing schedule, and the fp32 reference.

Phases (see ``evcli/engine/method.py``):

* ``transform`` (after ``--init-from`` / ``--weights`` load): every targeted Conv2d/Linear becomes a
  :class:`~evcli.methods.qat.quant.QuantConv2d` / ``QuantLinear`` (same ``weight``/``bias`` names), first conv and
  classifier at ``first_last_bits``; weight step sizes get LSQ's initial value from the loaded weights; a sparse
  source run's zeros become a kept ``sparse_mask``; LTS layers get their per-weight buffers.
* ``calibrate``: activation step sizes (LSQ init ``2·mean|x|/sqrt(Qp)``) and signedness from a few training batches
  run in full precision, and the MACs of every quantized layer (for the counted backward FLOPs).
* ``optimizers``: ``weights`` (the recipe's SGD over weights, BN, biases) and ``quant`` (Adam at ``qat.quant_lr``
  over the learned step sizes, no weight decay).
* per step: the LTS update (an explicit call at the first micro-batch, never inside ``forward``), cross-entropy,
  frozen gradients zeroed after backward, frozen values restored after the optimizer step.

All LTS state is in module buffers (distance EMA, previous level, freeze step, frozen value) and in
:meth:`QatMethod.state_dict` (the per-epoch report and its running sums), so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evcli.console import log
from evcli.engine.method import OptimizerSpec, StepOutput, decay_groups
from evcli.errors import CheckpointError, UsageError
from evcli.methods.classifier import ClassifierMethod
from evcli.methods.qat.lts import backward_flops_saved, lts_rho, lts_update, restore_frozen, zero_frozen_grad
from evcli.methods.qat.quant import LtsState, QuantConv2d, QuantLinear, is_quant_layer

QAT_KEY_PARTS = ("w_quant.", "a_quant.", "lts.", "sparse_mask")


def is_qat_key(key: str) -> bool:
    """A state-dict key that the quantized model has and the plain one does not."""
    return any(part in key for part in QAT_KEY_PARTS)


def classifier_of(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and isinstance(head, (nn.Linear, nn.Conv2d)):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the quantized layers of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_quant_layer(m)]


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def select_quant_layers(
    model: nn.Module, targets: list[str], ignore: list[str]
) -> tuple[list[tuple[str, nn.Module]], str | None, str | None]:
    """The Conv2d/Linear layers to quantize (default: all), and the names of the first layer and the classifier.

    Raises:
        UsageError: a pattern matches nothing, or the model has no Conv2d/Linear layer to quantize.
    """
    from evcli.methods.sparsify.layers import pattern_matches

    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for kind, patterns in (("targets", targets), ("ignore", ignore)):
        for p in patterns:
            if not any(pattern_matches(p, n, m) for n, m in layers):
                raise UsageError(
                    f"qat.{kind} pattern {p!r} matches no Conv2d/Linear layer of this model",
                    hint="patterns: a layer name (e.g. fc), re:<regex> (e.g. re:layer[1-4]\\..*conv), type:Conv2d",
                )
    head = classifier_of(model)
    first = layers[0][0] if layers else None
    last = next((n for n, m in layers if m is head), None)
    chosen = [
        (n, m)
        for n, m in layers
        if (not targets or any(pattern_matches(p, n, m) for p in targets))
        and not any(pattern_matches(p, n, m) for p in ignore)
    ]
    return chosen, first, last


class QatMethod(ClassifierMethod):
    """Quantization-aware training of a classifier (``qat.method``: lts, lsq or fp32)."""

    # the export is the quantized model's state (step sizes included): it loads after transform, not before
    export_is_transformed = True

    def __init__(self, recipe: Any):
        super().__init__(recipe)
        c = self.cfg
        self.label_smoothing = c.label_smoothing
        self.kind: str = c.method
        self.calibration_batches = 0 if self.kind == "fp32" else c.calibration_batches
        # LTS: whole frozen layers get no weight gradient at all, which DDP must accept
        self.ddp_find_unused_parameters = self.kind == "lts"
        self.layer_names: list[str] = []
        self.first_layer: str | None = None
        self.last_layer: str | None = None
        # state (state_dict)
        self.layer_macs: dict[str, int] = {}
        self.sparse_source: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []  # one row per epoch
        self.sums = {"steps": 0, "frozen": 0.0, "flops": 0.0, "ep_steps": 0, "ep_frozen": 0.0, "ep_flops": 0.0}
        self._last_frozen = 0.0
        self._step_started = -1

    # --- building -----------------------------------------------------------------------------

    def transform(self, modules: dict[str, nn.Module], ctx: Any) -> None:
        if self.kind == "fp32":
            log("qat: method fp32, no layer is quantized (the reference run)")
            return
        self.attach_to(modules["model"])

    def attach_to(self, model: nn.Module) -> None:
        """Swap the targeted layers of ``model`` for quantized ones (in place)."""
        c = self.cfg
        self._model = model  # the trained model (DDP wraps this object): its LTS state is in state_dict()
        chosen, first, last = select_quant_layers(model, c.targets, c.ignore)
        if not chosen:
            raise UsageError(
                f"model '{self.recipe.model.name}' has no Conv2d/Linear layer to quantize"
                + (" (qat.targets / qat.ignore leave none)" if c.targets or c.ignore else ""),
                hint="qat quantizes Conv2d and Linear layers; pick a CNN or ViT from timm",
            )
        w_bits, a_bits, fl_bits = c.resolved_bits()
        self.first_layer, self.last_layer = first, last
        learn_w = not (self.kind == "lts" and c.lts_weight_scale == "fixed")
        sparse_rows = []
        for name, mod in chosen:
            edge = name in (first, last)
            wb = fl_bits if edge else w_bits
            ab: int | None = fl_bits if edge else a_bits
            if name == first and not c.quantize_first_input:
                ab = None
            quant = dict(
                weight_bits=wb,
                act_bits=ab,
                per_channel=c.weight_granularity == "channel",
                learn_weight_step=learn_w,
                act_signed=name == first,  # the image input is signed; others decided by calibration
            )
            new = (
                QuantConv2d.from_conv(mod, **quant)
                if isinstance(mod, nn.Conv2d)
                else QuantLinear.from_linear(mod, **quant)
            )
            if c.keep_sparsity and self._has_init():
                # a run started from other weights has a mask buffer on every layer (the module structure must
                # not depend on data); a layer of a sparse source (>= 10% exact zeros) keeps its zeros through QAT
                sparse = float((mod.weight == 0).float().mean()) >= 0.1
                new.keep_sparsity((mod.weight != 0) if sparse else torch.ones_like(mod.weight))
                if sparse:
                    sparse_rows.append(name)
            if self.kind == "lts" and (name != last or c.lts_freeze_last):
                new.lts = LtsState(new.weight)
                new.skip_frozen_grad = c.skip_frozen_grad
            _set_child(model, name, new)
            self.layer_names.append(name)
        if sparse_rows:
            self.sparse_source = {**self._source_pattern(), "layers": sparse_rows}
            log(f"qat: kept the zeros of {len(sparse_rows)} sparse layers ({self.sparse_source.get('pattern')})")
        fp = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
        log(
            f"qat: {self.kind} W{w_bits}A{a_bits} on {len(chosen)} layers (first {first} and classifier {last} at "
            f"{fl_bits} bits{'' if c.quantize_first_input else ', image input unquantized'}); weight step "
            f"{'learned' if learn_w else 'fixed (LTS)'}, {c.weight_granularity}"
            + (f"; full precision: {', '.join(fp[:6])}{' ...' if len(fp) > 6 else ''}" if fp else "")
        )

    def _has_init(self) -> bool:
        m = self.recipe.model
        return bool(m.init_from or m.weights)

    def _source_pattern(self) -> dict[str, Any]:
        """The sparsity pattern of the --init-from / --weights source, from its evcli metadata when it has one."""
        from evcli.engine.run import resolve_weights_source
        from evcli.io.checkpoint import read_metadata

        m = self.recipe.model
        try:
            meta = read_metadata(resolve_weights_source(m.init_from or m.weights))
        except Exception:  # a file without evcli metadata: the zeros are kept all the same
            return {"pattern": "zeros of the source weights"}
        rec = meta.get("recipe") or {}
        sp = rec.get("sparsify") or {}
        if rec.get("command") == "sparsify" and sp.get("nm"):
            return {"pattern": str(sp["nm"]), "nm": str(sp["nm"]), "source_command": "sparsify"}
        if rec.get("command") == "sparsify" and sp.get("sparsity"):
            return {"pattern": f"{sp['sparsity']:g} unstructured", "sparsity": sp["sparsity"]}
        return {"pattern": "zeros of the source weights"}

    def adapt_weights(self, state: dict[str, torch.Tensor], module: nn.Module) -> tuple[dict, list[str]]:
        """A QAT run's weights start another run: their quantizer and LTS entries are dropped (the new run
        calibrates its own); then the classifier's adaptations."""
        dropped = [k for k in state if is_qat_key(k)]
        for k in dropped:
            del state[k]
        state, notes = super().adapt_weights(state, module)
        if dropped:
            notes.append(f"{len(dropped)} quantizer/LTS entries of the source run dropped (this run calibrates anew)")
        return state, notes

    @torch.no_grad()
    def calibrate(self, modules: Any, loader: Any, ctx: Any) -> None:
        """Activation step sizes and signedness from training batches in full precision; layer MACs."""
        model = modules.unwrap("model")
        layers = quant_layers(model)
        stats: dict[str, list[float]] = {n: [0.0, 0.0, float("inf")] for n, _ in layers}  # sum|x|, count, min
        macs: dict[str, int] = {}
        handles = []
        for name, layer in layers:
            layer.calibrating = True

            def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                x = inputs[0].detach().float()
                s = stats[name]
                s[0] += float(x.abs().sum())
                s[1] += x.numel()
                s[2] = min(s[2], float(x.min()))
                per_out = mod.weight[0].numel()
                macs[name] = int(output[0].numel() * per_out)

            handles.append(layer.register_forward_hook(hook))
        was = model.training
        model.eval()
        try:
            for x, _ in loader:
                model(x)
        finally:
            for h in handles:
                h.remove()
            for _, layer in layers:
                layer.calibrating = False
            model.train(was)
        for name, layer in layers:
            aq = layer.a_quant
            s = stats[name]
            if aq is None or not s[1]:
                continue
            signed = bool(aq.signed) or s[2] < 0
            aq.signed.fill_(signed)
            qp = aq.qn_qp[1]
            aq.step.fill_(max(2.0 * s[0] / s[1] / qp**0.5, 1e-8))
            aq.initialized.fill_(True)
        self.layer_macs = macs

    def optimizers(self, modules: Any, ctx: Any) -> dict[str, OptimizerSpec]:
        from evcli.recipe import OptimConfig

        self._ctx = ctx
        model = modules.unwrap("model")
        steps = [p for n, p in model.named_parameters() if n.endswith("quant.step")]
        ids = {id(p) for p in steps}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in ids]}
            for g in decay_groups(model, self.recipe.optim.weight_decay)
        ]
        specs = {"weights": OptimizerSpec([g for g in groups if g["params"]])}
        learned = [p for p in steps if p.requires_grad]
        if learned:
            quant = OptimConfig(name="adam", lr=self.cfg.quant_lr, weight_decay=0.0)
            specs["quant"] = OptimizerSpec(learned, lr=self.cfg.quant_lr, optim=quant)
        return specs

    # --- LTS ----------------------------------------------------------------------------------

    def lts_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in quant_layers(model) if m.lts is not None]

    def warmup_steps(self, ctx: Any) -> int:
        return ctx.resolve(self.cfg.lts_warmup)

    @torch.no_grad()
    def lts_step(self, model: nn.Module, ctx: Any) -> None:
        """One LTS update of every LTS layer from the weights this step starts from (once per optimizer step)."""
        c = self.cfg
        warm = self.warmup_steps(ctx)
        rho = lts_rho(ctx.step, warm, ctx.total_steps, c.lts_schedule, c.lts_rate) if ctx.step >= warm else None
        for _, layer in self.lts_layers(model):
            qn, qp = layer.w_quant.qn_qp
            s = layer.w_quant.step_view(layer.weight).detach().abs().clamp_min(1e-8)
            lts_update(layer.weight, s, qn, qp, layer.lts, ctx.step, c.lts_gamma, rho, layer.sparse_mask)

    def layer_rows(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per quantized layer: bits, weights, trainable (not pruned) weights, frozen weights and fraction, MACs."""
        rows = []
        for name, layer in quant_layers(model):
            n = layer.weight.numel()
            trainable = int(layer.sparse_mask.sum()) if layer.sparse_mask is not None else n
            frozen = int(layer.lts.frozen.sum()) if layer.lts is not None else 0
            rows.append(
                {
                    "layer": name,
                    "shape": list(layer.weight.shape),
                    "weight_bits": layer.w_quant.bits,
                    "act_bits": layer.a_quant.bits if layer.a_quant is not None else None,
                    "weights": n,
                    "trainable": trainable,
                    "frozen_weights": frozen,
                    "frozen": frozen / max(1, trainable),
                    "lts": layer.lts is not None,
                    "channels_skipped": 0
                    if layer.lts is None or layer.lts.active_channels is None
                    else int(layer.weight.shape[0] - layer.lts.active_channels.numel()),
                    "macs": self.layer_macs.get(name, 0),
                }
            )
        return rows

    @staticmethod
    def frozen_fraction(rows: list[dict[str, Any]]) -> float:
        return sum(r["frozen_weights"] for r in rows) / max(1, sum(r["trainable"] for r in rows))

    # --- hooks --------------------------------------------------------------------------------

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        if self.kind == "lts" and ctx.micro_step == 0:
            self._step_started = ctx.step  # steps done before this one
            self.lts_step(modules.unwrap("model"), ctx)
        out = super().training_step(modules, batch, ctx)
        logs = {}
        if self.kind == "lts":
            logs["lts_frozen"] = torch.tensor(self._last_frozen)
        return StepOutput(out.loss, logs)

    def after_backward(self, modules: Any, ctx: Any) -> None:
        if self.kind == "lts":
            for _, layer in self.lts_layers(modules.unwrap("model")):
                zero_frozen_grad(layer.weight, layer.lts)

    def after_optimizer_step(self, modules: Any, ctx: Any) -> None:
        if self.kind != "lts":
            return
        model = modules.unwrap("model")
        for _, layer in self.lts_layers(model):
            restore_frozen(layer.weight, layer.lts)
        rows = self.layer_rows(model)
        frozen = self.frozen_fraction(rows)
        flops = backward_flops_saved(rows)
        self._last_frozen = frozen
        s = self.sums
        s["steps"] += 1
        s["frozen"] += frozen
        s["flops"] += flops
        s["ep_steps"] += 1
        s["ep_frozen"] += frozen
        s["ep_flops"] += flops
        done = self._step_started + 1
        if done == ctx.total_steps and done % ctx.steps_per_epoch:
            # the run ends inside an epoch (max_steps): report that partial epoch too
            self._close_epoch(ctx, done // ctx.steps_per_epoch, done, rows, partial=True)

    def on_epoch_end(self, epoch: int, ctx: Any) -> None:
        if self.kind != "lts":
            return
        self._close_epoch(ctx, epoch, ctx.step, self.layer_rows(ctx.modules.unwrap("model")), partial=False)

    def _close_epoch(self, ctx: Any, epoch: int, step: int, rows: list[dict[str, Any]], partial: bool) -> None:
        """One row of the per-epoch LTS report (and its log line); resets the epoch's running sums."""
        s = self.sums
        n = max(1, s["ep_steps"])
        self.history.append(
            {
                "epoch": epoch,
                "step": step,
                "partial": partial,
                "frozen_end": self.frozen_fraction(rows),
                "updates_eliminated": s["ep_frozen"] / n,
                "backward_flops_saved_counted": s["ep_flops"] / n,
                "layers_entirely_frozen": sum(1 for r in rows if r["lts"] and r["frozen_weights"] == r["trainable"]),
                "channels_skipped": sum(r["channels_skipped"] for r in rows),
                "frozen_per_layer": {r["layer"]: round(r["frozen"], 5) for r in rows if r["lts"]},
            }
        )
        h = self.history[-1]
        log(
            f"lts epoch {epoch}{' (partial)' if partial else ''}: {100 * h['frozen_end']:.1f}% of weights frozen, "
            f"{100 * h['updates_eliminated']:.1f}% of weight updates eliminated in the epoch, "
            f"{100 * h['backward_flops_saved_counted']:.1f}% of the quantized layers' backward FLOPs saved (counted), "
            f"{h['channels_skipped']} channels skipped"
        )
        s["ep_steps"], s["ep_frozen"], s["ep_flops"] = 0, 0.0, 0.0

    def model_metrics(self, modules: Any, ctx: Any) -> dict[str, float]:
        if self.kind == "fp32":
            return {}
        rows = self.layer_rows(modules.unwrap("model"))
        out = {"weight_bits": float(self.cfg.resolved_bits()[0]), "act_bits": float(self.cfg.resolved_bits()[1])}
        lts = [m.lts for _, m in self.lts_layers(modules.unwrap("model"))]
        if lts and any(bool(s.started) for s in lts):  # not for a weights file (its LTS state is not in it)
            out["frozen"] = self.frozen_fraction(rows)
        if self.sparse_source:
            zeros = total = 0
            for _, layer in quant_layers(modules.unwrap("model")):
                if layer.sparse_mask is not None:
                    q = layer.int_weight()
                    zeros += int((q == 0).sum())
                    total += q.numel()
            out["sparsity"] = zeros / max(1, total)
        return out

    # --- the end ------------------------------------------------------------------------------

    def export(self, modules: Any, ctx: Any) -> dict[str, torch.Tensor]:
        """The quantized model's state (weights, step sizes, kept masks); the LTS state is training state only."""
        model = modules.unwrap("model")
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def artifacts(self, modules: Any, out_dir: Any, ctx: Any) -> dict[str, str]:
        """lts.json (per-layer frozen fractions, per-epoch history) and lts.png for LTS runs."""
        if self.kind != "lts":
            return {}
        from evcli.methods.qat.report import write_lts_report

        rows = self.layer_rows(modules.unwrap("model"))
        return write_lts_report(out_dir, rows, self.history, self.totals(), self.recipe.model.name)

    def totals(self) -> dict[str, Any]:
        s = self.sums
        n = max(1, s["steps"])
        return {
            "steps_counted": s["steps"],
            "updates_eliminated": s["frozen"] / n,
            "backward_flops_saved_counted": s["flops"] / n,
            "flops_counter": "counted, not timed: backward = dX + dW with equal MACs per quantized Conv2d/Linear; "
            "a frozen weight saves its share of dW (norms, activations and the forward not included)",
        }

    def report_extras(self, ctx: Any) -> dict[str, Any]:
        c = self.cfg
        w, a, fl = c.resolved_bits()
        extras: dict[str, Any] = {
            "qat": {
                "method": self.kind,
                "weight_bits": w,
                "act_bits": a,
                "first_last_bits": fl,
                "first_layer": self.first_layer,
                "classifier": self.last_layer,
                "quantized_layers": len(self.layer_names),
            }
        }
        if self.kind == "lts":
            extras["lts"] = {**self.totals(), "history": self.history}
        if self.sparse_source:
            extras["qat"]["sparse_source"] = self.sparse_source
        return extras

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "kind": self.kind,
            "layer_macs": dict(self.layer_macs),
            "sparse_source": dict(self.sparse_source),
            "history": list(self.history),
            "sums": dict(self.sums),
        }
        model = getattr(self, "_model", None)
        if self.kind == "lts" and model is not None:
            # per-weight LTS state: distance EMA, previous level, freeze step, frozen value (exact resume)
            state["lts"] = {name: layer.lts.state() for name, layer in self.lts_layers(model)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("kind") != self.kind:
            raise UsageError(f"checkpoint holds '{state.get('kind')}' qat state, the recipe is '{self.kind}'")
        self.layer_macs = {k: int(v) for k, v in state["layer_macs"].items()}
        self.sparse_source = dict(state["sparse_source"])
        self.history = list(state["history"])
        self.sums = {k: (int(v) if k.endswith("steps") else float(v)) for k, v in state["sums"].items()}
        model = getattr(self, "_model", None)
        if self.kind == "lts" and model is not None:
            saved = state.get("lts") or {}
            layers = dict(self.lts_layers(model))
            if set(saved) != set(layers):
                raise CheckpointError(
                    f"the checkpoint's LTS state covers {len(saved)} layers, this model has {len(layers)} LTS layers"
                )
            for name, layer in layers.items():
                layer.lts.load(saved[name])
