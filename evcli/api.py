"""The front door of evcli, shared by the CLI, the benches and Python users.

    from evcli import api
    recipe = api.resolve("sparsify", sets=["sparsify.nm=2:4", "schedule.epochs=2"])
    report = api.train(recipe)                       # a run folder with checkpoints, final weights, report
    report = api.evaluate(recipe, "runs/sparsify/<run>")
    loaded = api.load("runs/sparsify/<run>")         # the run's modules, ready to call
    logits = loaded.model(x)

Every function takes a resolved :class:`~evcli.recipe.Recipe`; the method object comes from the command's
registry entry unless one is passed (a method of your own, with a command registered for its recipe).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evcli.errors import CheckpointError, UsageError
from evcli.recipe import Recipe, locked_changes, recipe_from_saved, resolve_recipe


def resolve(
    command: str,
    recipe_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> Recipe:
    """The resolved recipe of ``command`` (defaults < file < flags < ``--set``)."""
    return resolve_recipe(command, recipe_file=recipe_file, flags=flags, sets=list(sets))


def method_for(recipe: Recipe) -> Any:
    """The registered method object of the recipe's command."""
    from evcli.registry import get_command

    return get_command(recipe.command).load_method_class()(recipe)


def train(recipe: Recipe, method: Any = None, resume_from: Path | None = None, restart: bool = False) -> dict[str, Any]:
    """Train ``recipe`` in its run folder (fresh, or resumed from a training checkpoint); returns the report.

    A fresh run claims a new or empty folder (``out.dir``, else ``runs/<command>/<time>-<model>-<method>``,
    suffixed when taken); ``restart`` starts over in a folder whose earlier run never checkpointed. Nothing is
    left behind when data, modules, weights or optimizers cannot be built.
    """
    from evcli.engine.run import write_run_files
    from evcli.engine.trainer import Trainer

    initial = []
    if resume_from is None:
        m = recipe.model
        if m.pretrained:  # timm's weights from the local Hugging Face cache; --init-from / --weights go over them
            from evcli.models.timm_models import cached_pretrained

            path = cached_pretrained(m.name)
            initial.append((_read(path, "pretrained weights")[1], f"{m.name} pretrained ({path})"))
        for source, what in ((m.init_from, "init-from"), (m.weights, "weights file")):
            if source:
                _check_model_folder(Path(source).expanduser(), m.name)
                state, path = plain_weights(source, what)
                initial.append((state, str(path)))
    explicit = recipe.out.dir is not None
    trainer = Trainer(
        recipe,
        method or method_for(recipe),
        Path(recipe.out.dir) if explicit else None,
        resume_from=resume_from,
        initial_weights=initial,
        explicit_dir=explicit,
        restart=restart,
    )
    return trainer.fit(on_ready=lambda: write_run_files(recipe, trainer.run_dir))


def resume(
    command: str,
    run_dir: str | Path,
    flags: dict[str, Any] | None = None,
    sets: Iterable[str] = (),
    force: bool = False,
) -> tuple[Recipe, Path]:
    """Recipe and checkpoint to continue ``run_dir``; refuses schedule-changing overrides without ``force``."""
    from evcli.engine.run import load_run_recipe, resume_checkpoint

    run_dir = Path(run_dir)
    ckpt = resume_checkpoint(run_dir)
    saved = load_run_recipe(run_dir)
    if saved.command != command:
        raise UsageError(f"{run_dir} is an 'evcli {saved.command}' run, not 'evcli {command}'")
    recipe = resolve_recipe(command, flags=flags, sets=list(sets), base=saved.to_dict())
    changed = locked_changes(saved, recipe)
    if changed and not force:
        raise UsageError(
            f"--resume would change {', '.join(changed)}, which alters the resumed run",
            hint="drop those overrides, or add --force to change them anyway",
        )
    recipe.out.dir = str(run_dir)
    return recipe, ckpt


@dataclass
class Loaded:
    """A run or weights file as ready modules (eval mode, on the device)."""

    recipe: Recipe
    method: Any
    modules: Any  # evcli.engine.method.Modules
    meta: dict[str, Any]
    path: Path
    trainer: Any

    @property
    def model(self) -> Any:
        """The weights module (the network a user calls)."""
        return self.modules.unwrap(self.method.weights_module)


def _read(source: str | Path, what: str) -> tuple[Path, dict, dict]:
    from evcli.engine.run import resolve_weights_source
    from evcli.io.checkpoint import read_safetensors

    path = resolve_weights_source(source)
    tensors, meta = read_safetensors(path, what)
    if meta.get("kind") == "packed_nm":  # a packed N:M export (evcli sparsify export): its dense weights
        from evcli.ops.nm import unpack_state

        tensors, meta = unpack_state(tensors, list(meta.get("packed_layers") or [])), {**meta, "kind": "weights"}
    return path, tensors, meta


def _restore(trainer: Any, tensors: dict, meta: dict, path: Path, strict: bool = True, ema: bool = False) -> None:
    """Build the trainer's modules and put the file's weights in (a training checkpoint after transform, exactly;
    plain weights into the weights module before transform)."""
    from evcli.io.checkpoint import decode_state

    trainer.ctx.classes = trainer.ctx.classes or list(meta.get("classes") or [])
    trainer.build_modules()
    if meta.get("kind") == "training":
        trainer.transform()
        if ema and not any(k.startswith("ema.") for k in tensors):
            raise CheckpointError(f"{path} holds no EMA weights (the run trained with train.ema off)")
        trainer.load_modules_from(tensors, str(path), prefix="ema." if ema else "module.")
        trainer.method.load_state_dict(decode_state(meta["state"], tensors)["method"])
        trainer.ctx.step = int(meta.get("step", 0))
    elif trainer.method.export_is_transformed and meta.get("command") == trainer.recipe.command:
        trainer.transform()  # the method's own export: the transformed module's state
        trainer.load_user_weights(tensors, str(path), strict=strict)
    else:
        trainer.load_user_weights(tensors, str(path), strict=strict)
        trainer.transform()
    for module in trainer.trained.values():
        module.to(trainer.accelerator.device).eval()


def load(source: str | Path, recipe: Recipe | None = None, method: Any = None, ema: bool = False) -> Loaded:
    """A run folder, training checkpoint or exported weights file as ready modules (``ema``: a training
    checkpoint's EMA weights).

    The file's own recipe (in its metadata) rebuilds the method unless ``recipe`` is given (needed for a file
    evcli did not write).
    """
    from evcli.engine.trainer import Trainer

    path, tensors, meta = _read(source, "weights file")
    if recipe is None:
        if "recipe" not in meta:
            raise CheckpointError(f"{path} carries no evcli recipe; pass the recipe it was trained with")
        recipe = recipe_from_saved(meta["recipe"])
    trainer = Trainer(recipe, method or method_for(recipe), None)
    _restore(trainer, tensors, meta, path, strict=recipe.model.weights_strict, ema=ema)
    return Loaded(recipe, trainer.method, trainer.eval_modules(), meta, path, trainer)


def plain_weights(source: str | Path, what: str) -> tuple[dict[str, Any], Path]:
    """The plain weights a ``--weights`` / ``--init-from`` source stands for: a weights file as it is, a run
    folder's final weights, or a training checkpoint exported through its own method first."""
    path, tensors, meta = _read(source, what)
    if meta.get("kind") != "training":
        return tensors, path
    loaded = load(path)
    return loaded.method.export(loaded.modules, loaded.trainer.ctx), path


def evaluation_recipe(
    command: str, weights: str | Path | None, recipe_file: Path | None, flags: dict[str, Any], sets: Iterable[str]
) -> Recipe:
    """Recipe for evaluating ``weights``: the recipe the weights were trained with (from their run folder or
    metadata) unless a recipe file is given, then the flags and --set on top."""
    from evcli.engine.run import load_run_recipe, resolve_weights_source
    from evcli.io.checkpoint import read_metadata

    base = None
    if recipe_file is None and weights is not None:
        p = Path(weights).expanduser()
        if p.is_dir() and ((p / "resolved_recipe.yaml").exists() or (p / "checkpoints").is_dir()):
            base = load_run_recipe(p).to_dict()
        else:
            base = read_metadata(resolve_weights_source(p)).get("recipe")
            if base is not None and base.get("command") != command:
                raise UsageError(f"{weights} was made by 'evcli {base.get('command')}', not 'evcli {command}'")
    recipe = resolve_recipe(command, recipe_file=recipe_file, flags=flags, sets=list(sets), base=base)
    recipe.model.weights = recipe.model.init_from = None
    return recipe


def evaluate(
    recipe: Recipe, weights: str | Path | None, method: Any = None, modules: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate a weights file, checkpoint or run folder on the recipe's val data (every val set), with the same
    loop, sharding and metrics as training. ``modules`` (instead of weights) evaluates given modules, e.g. a
    baseline with no parameters."""
    from evcli.engine.trainer import Trainer

    trainer = Trainer(recipe, method or method_for(recipe), None)
    trainer.build_data()
    if modules is not None:
        trainer.trained = {k: v.to(trainer.accelerator.device) for k, v in modules.items()}
        shown = "none (baseline)"
    else:
        if weights is None:
            raise UsageError("give weights to evaluate (a .safetensors file or a run folder)")
        path, tensors, meta = _read(weights, "weights file")
        saved, found = list(meta.get("classes") or []), list(trainer.ctx.classes)
        if saved and found and saved != found:
            raise UsageError(
                f"the data's classes ({_few(found)}) are not the classes {path} was trained on ({_few(saved)})",
                hint="evaluate on data with the same class folders (their names decide the label order)",
            )
        _restore(trainer, tensors, meta, path, strict=recipe.model.weights_strict)
        shown = str(path)
    trainer.val_loaders = trainer.make_val_loaders()
    metrics = trainer._evaluate_all(trainer.eval_modules())
    tables = trainer.ctx.last_tables
    return {
        "command": recipe.command,
        "method": getattr(recipe.method, "method", recipe.command),
        "model": recipe.model.name,
        "weights": shown,
        "data": trainer.data.description,
        "metrics": metrics,
        **({"tables": tables} if tables else {}),
    }


def check_new_file(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """An output path that replaces no existing file (unless ``overwrite``) and never one of ``inputs``."""
    p = Path(path)
    for source in inputs:
        if Path(source).exists() and p.exists() and p.resolve() == Path(source).resolve():
            raise UsageError(f"the output {p} is one of the inputs; evcli never writes over its input")
    if p.exists() and not overwrite:
        raise UsageError(f"{p} already exists", hint="choose another output, or add --overwrite to replace it")
    if p.is_dir():
        raise UsageError(f"the output {p} is a folder, expected a file name")
    return p


def _check_model_folder(folder: Path, model_name: str) -> None:
    """A timm model folder (``config.json`` + ``model.safetensors``) must describe this run's architecture."""
    import json

    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        return
    try:
        architecture = json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (ValueError, OSError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {config}: not a JSON model config") from exc
    if architecture and architecture.partition(".")[0] != model_name.partition(".")[0]:
        raise UsageError(
            f"{config} describes a '{architecture}', this run builds a '{model_name}'",
            hint=f"use --model {architecture}, or weights of a {model_name}",
        )


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def export(
    command: str,
    run: str | Path,
    which: str = "best",
    output: str | Path | None = None,
    overwrite: bool = False,
    format: str = "safetensors",
) -> dict[str, Any]:
    """Export a run's best / last checkpoint (or the last one's EMA weights, ``which="ema"``) through the method's
    export, with val metrics measured on the exported weights.

    ``format``: ``safetensors`` (one weights file), or ``timm`` (a folder with ``model.safetensors`` and a timm
    ``config.json``: architecture and its arguments, classes, and the preprocessing evcli used, which
    ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads). An existing output is replaced only with
    ``overwrite``, never a checkpoint of the run.
    """
    from evcli.io.checkpoint import read_metadata, save_weights

    if which not in ("best", "last", "ema"):
        raise UsageError(f"--which must be best, last or ema, got {which!r}")
    if format not in ("safetensors", "timm", "onnx"):
        raise UsageError(f"--format must be safetensors, timm or onnx, got {format!r}")
    run = Path(run).expanduser()
    if run.is_dir():
        ckpt = run / "checkpoints" / f"{'last' if which == 'ema' else which}.safetensors"
        if not ckpt.exists() and which == "best":
            ckpt = run / "checkpoints" / "last.safetensors"
        if not ckpt.exists():
            raise CheckpointError(f"no checkpoint in {run}/checkpoints to export")
    else:
        ckpt = run
    meta = read_metadata(ckpt)
    if meta.get("kind") != "training":
        raise CheckpointError(f"{ckpt} is not an evcli training checkpoint")
    if meta.get("command") != command:
        raise UsageError(f"{ckpt} is an 'evcli {meta.get('command')}' checkpoint, not 'evcli {command}'")
    folder = run if run.is_dir() else ckpt.parent.parent
    name = f"export-{which}" + {"timm": "-timm", "onnx": ".onnx"}.get(format, ".safetensors")
    out = Path(output) if output else folder / name
    protected = [ckpt, *(folder / "checkpoints").glob("*.safetensors")]
    if format == "timm":
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
            raise UsageError(f"{out} exists and is not an empty folder", hint="choose another --output, or --overwrite")
        weights_file = out / "model.safetensors"
    else:
        weights_file = out
    check_new_file(weights_file, overwrite, inputs=protected)
    loaded = load(ckpt, ema=which == "ema")
    ctx = loaded.trainer.ctx
    exported = loaded.method.export(loaded.modules, ctx)
    live = loaded.method.model_metrics(loaded.modules, ctx)
    metrics, note = measure_weights(loaded.recipe, exported, list(ctx.classes))
    out_meta = {**loaded.trainer.checkpoint_meta(), "metrics": metrics, "metrics_note": note}
    onnx_check = None
    if format == "timm":
        _write_timm_config(loaded, exported, out)
    if format == "onnx":
        onnx_check = _write_onnx(loaded, exported, out)
        path = out
    else:
        path = save_weights(weights_file, exported, out_meta)
    return {
        **({"onnx_check": onnx_check} if onnx_check is not None else {}),
        "checkpoint": str(ckpt),
        "which": which,
        "step": ctx.step,
        "weights": str(path),
        "format": format,
        "tensors": len(exported),
        "metrics": metrics,
        "metrics_note": note,
        "checkpoint_model_metrics": live,
    }


def _plain_model(loaded: Loaded, exported: dict[str, Any]) -> Any:
    """The plain network as ``build`` makes it (no train-time swaps) holding the exported weights, eval mode."""
    from evcli.engine.trainer import Trainer

    plain = Trainer(loaded.recipe, method_for(loaded.recipe), None)
    plain.ctx.classes = list(loaded.trainer.ctx.classes)
    plain.build_modules()
    model = plain.trained[loaded.method.weights_module]
    model.load_state_dict(exported)
    return model.eval()


def _write_onnx(loaded: Loaded, exported: dict[str, Any], out: Path) -> dict[str, Any]:
    """Export the network to ONNX (dynamic batch) and check it against PyTorch on the run's val data with
    onnxruntime when it is installed: max |logit| error and top-1 of both; a mismatch is an error."""
    import importlib.util

    import torch

    shape = getattr(loaded.method, "onnx_input_shape", None)
    if shape is None:
        raise UsageError(f"--format onnx exports image classifiers; 'evcli {loaded.recipe.command}' is not one")
    if importlib.util.find_spec("onnx") is None:
        raise UsageError("--format onnx needs the 'onnx' package", hint='pip install "evcli[onnx]" (onnx, onnxruntime)')
    model = _plain_model(loaded, exported)
    example = torch.zeros(2, *shape(loaded.recipe))
    import warnings

    try:
        with warnings.catch_warnings():  # the TorchScript-based exporter: no onnxscript needed, deprecated in torch
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(out),
                dynamo=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as exc:  # an operator ONNX cannot carry: the exporter names it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        out.unlink(missing_ok=True)
        raise UsageError(f"ONNX cannot carry this model: {first}") from exc
    return _check_onnx(loaded, model, out)


def _check_onnx(loaded: Loaded, model: Any, path: Path) -> dict[str, Any]:
    import importlib.util

    import numpy as np
    import torch

    from evcli.engine.trainer import Trainer
    from evcli.errors import DataError

    if importlib.util.find_spec("onnxruntime") is None:
        return {"checked": False, "runtime": None, "note": "not checked: onnxruntime is not installed"}
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runtime = f"onnxruntime {ort.__version__} CPUExecutionProvider"
    trainer = Trainer(loaded.recipe, method_for(loaded.recipe), None)
    try:
        trainer.build_data()
    except DataError as exc:
        return {"checked": False, "runtime": runtime, "note": f"not checked: no val data here ({exc.message})"}
    loader = next(iter(trainer.make_val_loaders().values()))
    worst, hits_torch, hits_ort, n = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            ref = model(x).float()
            got = torch.from_numpy(session.run(None, {"images": x.numpy().astype(np.float32)})[0])
            worst = max(worst, float((ref - got).abs().max()))
            hits_torch += int((ref.argmax(1) == y).sum())
            hits_ort += int((got.argmax(1) == y).sum())
            n += len(y)
    check = {
        "checked": True,
        "runtime": runtime,
        "images": n,
        "max_abs_logit_error": worst,
        "top1_pytorch": 100.0 * hits_torch / max(n, 1),
        "top1_onnx": 100.0 * hits_ort / max(n, 1),
    }
    if worst > 1e-3 or abs(hits_torch - hits_ort) > max(1, n // 200):
        from evcli.errors import EvcliError

        raise EvcliError(
            f"the ONNX export does not score like the PyTorch model on {runtime}: max logit error {worst:.3g}, "
            f"top-1 {check['top1_onnx']:.2f}% vs {check['top1_pytorch']:.2f}%"
        )
    return check


def _write_timm_config(loaded: Loaded, exported: dict[str, Any], folder: Path) -> None:
    """timm's config.json for the exported weights: the architecture with the arguments it was built with, the
    class names, and the preprocessing of the run (input size, mean / std, crop_pct, interpolation)."""
    from timm.models._hub import save_config_for_hf

    model = _plain_model(loaded, exported)
    if not hasattr(model, "pretrained_cfg"):
        raise UsageError(f"--format timm is for timm models; 'evcli {loaded.recipe.command}' exports another kind")
    r = loaded.recipe
    mean, std = getattr(loaded.method, "norm_mean", None), getattr(loaded.method, "norm_std", None)
    data_config = {
        "input_size": (3, r.data.img_size, r.data.img_size),
        "crop_pct": r.data.crop_pct,
        "interpolation": r.data.interpolation,
        **({"mean": tuple(mean), "std": tuple(std)} if mean is not None else {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(loaded.trainer.ctx.classes)
    save_config_for_hf(
        model,
        str(folder / "config.json"),
        model_config={"label_names": classes} if classes else None,
        data_config=data_config,
    )


def measure_weights(recipe: Recipe, state: dict[str, Any], classes: list[str]) -> tuple[dict[str, float], str]:
    """Metrics of plain (exported) weights on the recipe's val data, as ``evaluate`` computes them, and a note
    saying what they measured; no metrics when the data cannot be read here."""
    from evcli.engine.trainer import Trainer
    from evcli.errors import DataError

    trainer = Trainer(recipe, method_for(recipe), None)
    try:
        trainer.build_data()
    except DataError as exc:
        return {}, f"not measured: the run's val data cannot be read here ({exc.message})"
    meta = {"kind": "weights", "classes": classes, "command": recipe.command}
    _restore(trainer, state, meta, Path("the export"), strict=True)
    trainer.val_loaders = trainer.make_val_loaders()
    metrics = trainer._evaluate_all(trainer.eval_modules())
    return metrics, f"measured on the exported weights: {trainer.data.description}"
