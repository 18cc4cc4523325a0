"""The integer export of a QAT run, its check against the fake-quant model, and the int8 QDQ ONNX export.

Integer export (``export-<which>.int.safetensors``, metadata ``kind: qat_int``). For every quantized layer
``<L>`` (its name in the model, e.g. ``layer1.0.conv1``):

* ``<L>.weight_q``: the integer weight levels. 2- and 4-bit layers: packed into uint8, 8/b values per byte,
  first value in the lowest bits, each stored as ``level - Qn`` (Qn = -2^(b-1)), flattened in the weight's
  C-order; 3- and 8-bit layers: int8 of the weight's shape.
* ``<L>.weight_scale``: float32 step size, shape [] (per tensor) or [out_channels] (per channel).
  Dequantized weight = level · weight_scale (broadcast over the output-channel axis 0).
* ``<L>.input_scale``: float32 [] activation step size of the layer's input (absent when its input is not
  quantized); input levels are ``clamp(round(x / input_scale), Qn, Qp)`` with the range of the layer's
  ``act_bits`` and ``act_signed`` in the metadata.
* ``<L>.bias``: float32, as trained.

Every other tensor of the model (norms, unquantized layers) is stored as float32 under its own name. The
metadata's ``layers`` maps each ``<L>`` to ``{shape, weight_bits, per_channel, packed, act_bits, act_signed}``;
``scheme`` repeats this description; ``sparse`` names a kept sparsity pattern and its layers.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evcli.errors import CheckpointError, EvcliError, UsageError
from evcli.methods.qat.quant import level_range

SCHEME = (
    "evcli qat integer export v1: <L>.weight_q levels (2/4-bit packed uint8, 8/b per byte, low bits first, "
    "stored as level-Qn, C-order; else int8), <L>.weight_scale (float32, [] or [out]), <L>.input_scale "
    "(float32 [], input levels clamp(round(x/s),Qn,Qp)), dequantized weight = level*weight_scale; other tensors "
    "float32 as in the model"
)
PACKED_BITS = (2, 4)


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit integer levels into uint8 (8/bits per byte, first value in the low bits)."""
    if bits not in PACKED_BITS:
        raise ValueError(f"packing is for {PACKED_BITS} bits, got {bits}")
    qn, _ = level_range(bits, True)
    u = (levels.flatten().to(torch.int16) - qn).to(torch.uint8)
    per = 8 // bits
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, torch.zeros(pad, dtype=torch.uint8)])
    u = u.reshape(-1, per)
    out = torch.zeros(u.shape[0], dtype=torch.uint8)
    for i in range(per):
        out |= u[:, i] << (bits * i)
    return out


def unpack_levels(packed: torch.Tensor, bits: int, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: int8 levels of ``shape``."""
    qn, _ = level_range(bits, True)
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    u = torch.stack(parts, 1).flatten()[: math.prod(shape)]
    return (u.to(torch.int16) + qn).to(torch.int8).reshape(shape)


@torch.no_grad()
def integer_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The integer export of a quantized model: tensors and the ``layers`` metadata (see the module docstring)."""
    from evcli.methods.qat.method import is_qat_key, quant_layers

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    quant_names = set()
    for name, layer in quant_layers(model):
        quant_names.add(name)
        bits = layer.w_quant.bits
        q = layer.int_weight().to(torch.int8)
        packed = bits in PACKED_BITS
        tensors[f"{name}.weight_q"] = pack_levels(q, bits) if packed else q.contiguous()
        tensors[f"{name}.weight_scale"] = layer.w_quant.step.detach().abs().float().clone()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().float().clone()
        info: dict[str, Any] = {
            "shape": list(layer.weight.shape),
            "weight_bits": bits,
            "per_channel": bool(layer.w_quant.channels),
            "packed": packed,
            "act_bits": None,
            "act_signed": None,
        }
        if layer.a_quant is not None:
            tensors[f"{name}.input_scale"] = layer.a_quant.step.detach().abs().float().clone()
            info["act_bits"] = layer.a_quant.bits
            info["act_signed"] = bool(layer.a_quant.signed)
        layers[name] = info
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quant_names or is_qat_key(key):
            continue
        tensors[key] = value.detach().float().clone() if value.is_floating_point() else value.detach().clone()
    return tensors, layers


@torch.no_grad()
def load_integer_state(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, Any], source: str) -> None:
    """Put an integer export into a quantized model of the same recipe (built and transformed): dequantized
    weights, step sizes; every other tensor by name.

    Raises:
        CheckpointError: the file does not fit the model.
    """
    from evcli.io.checkpoint import load_model_weights
    from evcli.methods.qat.method import is_qat_key, quant_layers

    own = dict(quant_layers(model))
    if set(own) != set(layers):
        raise CheckpointError(f"{source}: its quantized layers do not match this model's ({len(layers)} vs {len(own)})")
    rest = {}
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if owner in own and leaf in ("weight_q", "weight_scale", "input_scale", "bias"):
            continue
        rest[key] = value
    for name, info in layers.items():
        layer = own[name]
        bits = int(info["weight_bits"])
        if bits != layer.w_quant.bits or list(info["shape"]) != list(layer.weight.shape):
            raise CheckpointError(f"{source}: layer {name} is {bits}-bit {info['shape']}, the model's is not")
        raw = tensors[f"{name}.weight_q"]
        q = unpack_levels(raw, bits, info["shape"]) if info["packed"] else raw
        scale = tensors[f"{name}.weight_scale"].to(layer.weight.device)
        layer.w_quant.step.copy_(scale.reshape(layer.w_quant.step.shape))
        layer.weight.copy_(q.to(layer.weight.dtype) * layer.w_quant.step_view(layer.weight))
        if layer.sparse_mask is not None:
            layer.sparse_mask.copy_((q != 0).to(layer.sparse_mask.dtype))
        if layer.bias is not None:
            layer.bias.copy_(tensors[f"{name}.bias"])
        if layer.a_quant is not None:
            if f"{name}.input_scale" not in tensors:
                raise CheckpointError(f"{source}: no input_scale for the quantized input of {name}")
            layer.a_quant.step.copy_(tensors[f"{name}.input_scale"].reshape(()))
            layer.a_quant.signed.fill_(bool(info["act_signed"]))
            layer.a_quant.initialized.fill_(True)
    plain_keys = {k: v for k, v in model.state_dict().items() if not is_qat_key(k)}
    expected = {k for k in plain_keys if k.rsplit(".", 1)[0] not in own}
    missing = sorted(expected - set(rest))
    unexpected = sorted(set(rest) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model (missing: {', '.join(missing[:4]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:4]) or '-'})"
        )
    load_model_weights(model, rest, source, strict=False)


def _checkpoint_of(run: Path, which: str) -> Path:
    if which not in ("best", "last"):
        raise UsageError(f"--which must be best or last, got {which!r}")
    if run.is_dir():
        ckpt = run / "checkpoints" / f"{which}.safetensors"
        if not ckpt.exists() and which == "best":
            ckpt = run / "checkpoints" / "last.safetensors"
        if not ckpt.exists():
            raise CheckpointError(f"no checkpoint in {run}/checkpoints to export")
        return ckpt
    if not run.exists():
        raise CheckpointError(f"not found: {run}")
    return run


def rebuild_quantized(recipe: Any, classes: list[str]) -> tuple[Any, nn.Module]:
    """A fresh quantized model of ``recipe`` (built and transformed, no weights): (method, model)."""
    from evcli import api
    from evcli.engine.trainer import Trainer

    recipe = copy.deepcopy(recipe)
    recipe.model.init_from = recipe.model.weights = None  # the export carries the weights (zeros included)
    trainer = Trainer(recipe, api.method_for(recipe), None)
    trainer.ctx.classes = list(classes)
    trainer.build_modules()
    trainer.transform()
    return trainer.method, trainer.trained["model"].eval()


def read_integer_export(path: str | Path) -> tuple[Any, nn.Module, dict[str, Any]]:
    """An integer export as a ready fake-quant model (eval mode): (recipe, model, metadata)."""
    from evcli.io.checkpoint import read_safetensors
    from evcli.recipe import recipe_from_saved

    tensors, meta = read_safetensors(path, "integer export")
    if meta.get("kind") != "qat_int":
        raise CheckpointError(f"{path} is not an evcli qat integer export")
    recipe = recipe_from_saved(meta["recipe"])
    _, model = rebuild_quantized(recipe, list(meta.get("classes") or []))
    load_integer_state(model, tensors, meta["layers"], str(path))
    return recipe, model, meta


def _val_loader(recipe: Any) -> tuple[Any, str] | tuple[None, str]:
    from evcli import api
    from evcli.engine.trainer import Trainer
    from evcli.errors import DataError

    trainer = Trainer(recipe, api.method_for(recipe), None)
    try:
        trainer.build_data()
    except DataError as exc:
        return None, f"not measured: the run's val data cannot be read here ({exc.message})"
    return next(iter(trainer.make_val_loaders().values())), trainer.data.description


@torch.no_grad()
def compare_models(reference: nn.Module, other: Any, loader: Any, max_batches: int | None = None) -> dict[str, Any]:
    """Max |logit| difference and top-1 of ``reference`` and ``other`` (a module or a callable on a batch)."""
    worst, hits_ref, hits_other, n = 0.0, 0, 0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ref = reference(x).float()
        got = other(x).float()
        worst = max(worst, float((ref - got).abs().max()))
        hits_ref += int((ref.argmax(1) == y).sum())
        hits_other += int((got.argmax(1) == y).sum())
        n += len(y)
    return {
        "images": n,
        "max_abs_logit_error": worst,
        "top1_reference": 100.0 * hits_ref / max(1, n),
        "top1_other": 100.0 * hits_other / max(1, n),
    }


def sparse_check(tensors: dict[str, torch.Tensor], layers: dict[str, Any], sparse: dict[str, Any]) -> dict[str, Any]:
    """The kept sparsity of an integer export: N:M of every sparse layer's levels, or their zero fraction."""
    from evcli.ops.nm import nm_violations
    from evcli.ops.nm_pattern import parse_nm

    rows, failing, zeros, total = [], [], 0, 0
    nm = parse_nm(sparse["nm"]) if sparse.get("nm") else None
    for name in sparse.get("layers", []):
        info = layers[name]
        raw = tensors[f"{name}.weight_q"]
        q = unpack_levels(raw, info["weight_bits"], info["shape"]) if info["packed"] else raw
        z = int((q == 0).sum())
        zeros += z
        total += q.numel()
        row = {"layer": name, "sparsity": z / q.numel()}
        if nm:
            bad = nm_violations(q.float(), *nm)
            row["nm_ok"] = bad == 0
            if bad:
                failing.append(name)
        rows.append(row)
    overall = zeros / max(1, total)
    if not nm and sparse.get("sparsity") and overall < float(sparse["sparsity"]) - 0.005:
        failing.append(f"overall sparsity {overall:.4f} < {sparse['sparsity']}")
    return {
        "pattern": sparse.get("pattern"),
        "layers": rows,
        "overall_sparsity": overall,
        "failing": failing,
        "ok": not failing,
    }


def export_run(
    run: str | Path,
    which: str = "best",
    output: str | Path | None = None,
    overwrite: bool = False,
    onnx: bool = False,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Write a QAT run's integer export, read it back and check it against the fake-quant model on the val data
    (max |logit| error, top-1 of both); with ``onnx``, also the int8 QDQ ONNX file checked with onnxruntime."""
    from evcli import api
    from evcli.io.checkpoint import read_metadata, read_safetensors, save_safetensors

    run = Path(run).expanduser()
    ckpt = _checkpoint_of(run, which)
    meta = read_metadata(ckpt)
    if meta.get("kind") != "training":
        raise CheckpointError(f"{ckpt} is not an evcli training checkpoint")
    if meta.get("command") != "qat":
        raise UsageError(f"{ckpt} is an 'evcli {meta.get('command')}' checkpoint, not a QAT run ('evcli qat')")
    folder = run if run.is_dir() else ckpt.parent.parent
    out = Path(output) if output else folder / f"export-{which}.int.safetensors"
    protected = [ckpt, *(folder / "checkpoints").glob("*.safetensors")]
    api.check_new_file(out, overwrite, inputs=protected)
    onnx_out = out.with_name(out.name.removesuffix(".safetensors").removesuffix(".int") + ".int8.onnx")
    if onnx:
        api.check_new_file(onnx_out, overwrite, inputs=protected)
    loaded = api.load(ckpt)
    method = loaded.method
    if method.kind == "fp32":
        raise UsageError(f"{ckpt} is an fp32 reference run: there is nothing quantized to export as integers")
    model = loaded.model.eval()
    tensors, layers = integer_state(model)
    classes = list(loaded.trainer.ctx.classes)
    out_meta = {
        **loaded.trainer.checkpoint_meta(),
        "kind": "qat_int",
        "scheme": SCHEME,
        "layers": layers,
        "sparse": dict(method.sparse_source),
    }
    path = save_safetensors(out, tensors, out_meta)
    # read back from disk: the check is of the file, not of the tensors in memory
    back, back_meta = read_safetensors(path, "integer export")
    _, rebuilt = rebuild_quantized(loaded.recipe, classes)
    load_integer_state(rebuilt, back, back_meta["layers"], str(path))
    loader, data_note = _val_loader(loaded.recipe)
    res: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "which": which,
        "step": loaded.trainer.ctx.step,
        "weights": str(path),
        "file_bytes": path.stat().st_size,
        "fp32_bytes": sum(
            p.numel() * 4
            for k, p in model.state_dict().items()
            if p.is_floating_point() and ".lts." not in k and "quant." not in k
        ),
        "layers": len(layers),
        "bits": sorted({v["weight_bits"] for v in layers.values()}),
        "data": data_note,
    }
    if loader is not None:
        check = compare_models(model, rebuilt, loader, max_batches)
        res["check"] = {**check, "what": "fake-quant model (checkpoint) vs the integer export dequantized"}
        if check["max_abs_logit_error"] > 1e-3:
            raise EvcliError(
                f"the integer export does not reproduce the fake-quant model: max logit error "
                f"{check['max_abs_logit_error']:.3g} on {check['images']} val images"
            )
    if method.sparse_source:
        res["sparse"] = sparse_check(back, back_meta["layers"], method.sparse_source)
    if onnx:
        from evcli.methods.qat.onnx_export import write_qdq_onnx

        res["onnx"] = write_qdq_onnx(model, onnx_out, loaded.recipe, loader, max_batches)
    return res


def evaluation_source(path: str | Path) -> tuple[Path, bool]:
    """What ``evcli qat eval`` evaluates: an integer export as it is; a run folder's best (else last) training
    checkpoint (the fake-quant model with its step sizes); any other file as given. Returns (path, is_int)."""
    from evcli.io.checkpoint import read_metadata

    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best", "last"):
            ckpt = p / "checkpoints" / f"{name}.safetensors"
            if ckpt.exists():
                return ckpt, False
        raise CheckpointError(f"no checkpoint in {p}/checkpoints to evaluate")
    if not p.exists():
        raise CheckpointError(f"not found: {p}")
    return p, read_metadata(p, "weights file").get("kind") == "qat_int"


def evaluate_integer_export(path: Path, data: Path | None, batch_size: int | None) -> dict[str, Any]:
    """Top-1/top-5/loss of an integer export on the val data of its recipe (or ``data``)."""
    from evcli import api

    recipe, model, meta = read_integer_export(path)
    if data is not None:
        recipe.data.path = str(Path(data).expanduser().absolute())
    if batch_size is not None:
        recipe.data.eval_batch_size = batch_size
    report = api.evaluate(recipe, None, modules={"model": model})
    report["weights"] = str(path)
    return report
