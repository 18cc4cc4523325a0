"""Sparse exports after training: per-layer report and chart, packed N:M files, verification, honest benchmarks.

These work on exported weight files (``final.safetensors``, ``export-*.safetensors``): the masks are
already folded in, and the run's recipe in the file's metadata names the model and the targeted layers.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evcli.console import warn
from evcli.errors import CheckpointError, UsageError
from evcli.io.checkpoint import atomic_write_text, model_weights_from, read_safetensors, save_safetensors
from evcli.ops.nm import expected_packed_ratio, pack_nm, packed_nbytes, parse_nm, unpack_nm

# --------------------------------------------------------------------------------------------------
# Per-layer report and chart


def write_layer_report(run_dir: str | Path, rows: list[dict[str, Any]], title: str) -> dict[str, str]:
    """Write ``sparsity.json`` and the per-layer sparsity bar chart ``sparsity.png`` into ``run_dir``."""
    run_dir = Path(run_dir)
    json_path = atomic_write_text(run_dir / "sparsity.json", json.dumps({"title": title, "layers": rows}, indent=2))
    png_path = run_dir / "sparsity.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layer"] for r in rows]
    values = [100.0 * r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(rows) + 1.2)))
    ax.barh(range(len(rows)), values, color="#4C72B0")
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity of the exported weight (%)")
    total = sum(r["weights"] for r in rows)
    nz = sum(r["nonzeros"] for r in rows)
    ax.set_title(f"{title}: {100.0 * (1 - nz / max(1, total)):.1f}% of {total / 1e6:.2f}M targeted weights are zero")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".sparsity.", suffix=".png", dir=run_dir)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return {"chart": str(png_path), "layers": str(json_path)}


# --------------------------------------------------------------------------------------------------
# Which layers a weights file was sparsified on


def _recipe_of(meta: dict[str, Any]) -> Any | None:
    data = meta.get("recipe")
    if not isinstance(data, dict) or data.get("command") != "sparsify":
        return None
    from evcli.recipe import recipe_from_saved

    return recipe_from_saved(data)


def _build_model(recipe: Any, num_classes: int) -> nn.Module:
    from evcli.models.timm_models import create_model

    m = recipe.model
    torch.manual_seed(0)
    return create_model(
        m.name,
        num_classes=m.num_classes or num_classes,
        img_size=recipe.data.img_size,
        patch_size=m.patch_size,
        kwargs=m.kwargs,
    )


def targeted_keys(meta: dict[str, Any], tensors: dict[str, torch.Tensor], m: int | None) -> tuple[list[str], str]:
    """Weight keys to check, and how they were chosen (the run's layer targeting, or every conv/linear weight)."""
    from evcli.methods.sparsify.layers import select_layers

    recipe = _recipe_of(meta)
    if recipe is not None:
        model = _build_model(recipe, int(meta.get("num_classes") or 10))
        choice = select_layers(model, recipe.method.targets, recipe.method.ignore, m)
        keys = [f"{name}.weight" for name, _ in choice.selected]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"weights file lacks targeted layers: {', '.join(missing[:4])}")
        return keys, f"the layers targeted by the run ({recipe.model.name})"
    keys = [
        k
        for k, v in tensors.items()
        if k.endswith(".weight") and v.is_floating_point() and v.dim() in (2, 4) and (m is None or v.shape[1] % m == 0)
    ]
    return keys, "every 2-D/4-D weight" + (f" whose input channels divide by {m}" if m else "")


# --------------------------------------------------------------------------------------------------
# Verify


def _load_plain(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain weights of an exported, packed N:M or training file."""
    tensors, meta = read_safetensors(path, "weights file")
    if meta.get("kind") == "packed_nm":
        from evcli.ops.nm import unpack_state

        return unpack_state(tensors, list(meta.get("packed_layers") or [])), meta
    if meta.get("kind") == "qat_int":  # an integer export of evcli qat: the weight levels carry the zeros
        from evcli.methods.qat.export import unpack_levels

        levels = {}
        for name, info in (meta.get("layers") or {}).items():
            raw = tensors.get(f"{name}.weight_q")
            if raw is None:
                raise CheckpointError(f"{path} lacks {name}.weight_q named in its metadata")
            q = unpack_levels(raw, int(info["weight_bits"]), info["shape"]) if info.get("packed") else raw
            levels[f"{name}.weight"] = q.float()
        return levels, meta
    return model_weights_from(tensors, meta), meta


def verify_file(
    path: str | Path, nm: str | None = None, sparsity: float | None = None, tol: float = 0.005
) -> dict[str, Any]:
    """Check that every targeted weight of ``path`` is N:M (or that they reach ``sparsity`` together).

    The pattern defaults to the one of the run that made the file. Returns the per-layer rows, the failing
    layers and ``ok``.
    """
    path = Path(path)
    tensors, meta = _load_plain(path)
    if nm is not None and sparsity is not None:
        raise UsageError("verify takes --nm or --sparsity, not both")
    sparse = meta.get("sparse") if meta.get("kind") == "qat_int" else None
    if nm is None and sparsity is None and sparse:  # a QAT run that kept a sparse run's pattern says which
        nm, sparsity = sparse.get("nm"), sparse.get("sparsity")
        if nm is None and sparsity is None:
            raise UsageError(f"{path} kept {sparse.get('pattern')}; say what to check with --nm 2:4 or --sparsity 0.9")
    if nm is None and sparsity is None:
        recipe = _recipe_of(meta)
        if recipe is None:
            raise UsageError(f"{path} has no evcli sparsify recipe; say what to check with --nm 2:4 or --sparsity 0.9")
        nm, sparsity = recipe.method.nm, recipe.method.sparsity
        if nm is None and sparsity is None:
            raise UsageError(f"{path} is from a dense run; say what to check with --nm 2:4 or --sparsity 0.9")
    pattern = None
    if nm is not None:
        try:
            pattern = parse_nm(nm)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    elif not 0.0 < float(sparsity) < 1.0:
        raise UsageError(f"--sparsity must be in (0, 1), got {sparsity}")
    if meta.get("kind") == "qat_int":
        layers = list((sparse or {}).get("layers") or [])
        keys = [f"{name}.weight" for name in layers] or [k for k in tensors if pattern is None or
                                                          tensors[k].shape[1] % pattern[1] == 0]  # fmt: skip
        chosen = "the layers the QAT run kept sparse" if layers else "every quantized layer"
    else:
        keys, chosen = targeted_keys(meta, tensors, pattern[1] if pattern else None)
    if not keys:
        raise UsageError(f"{path} has no layer that can be checked for {nm or sparsity}")
    rows, failing = [], []
    zeros = total = 0
    for key in keys:
        w = tensors[key]
        nz = int((w != 0).sum())
        row: dict[str, Any] = {
            "layer": key.removesuffix(".weight"),
            "shape": list(w.shape),
            "weights": w.numel(),
            "nonzeros": nz,
            "sparsity": 1.0 - nz / w.numel(),
        }
        zeros += w.numel() - nz
        total += w.numel()
        if pattern:
            from evcli.ops.nm import nm_violations

            bad = nm_violations(w, *pattern)
            row["bad_groups"] = bad
            row["ok"] = bad == 0
            if bad:
                failing.append(row["layer"])
        rows.append(row)
    overall = zeros / max(1, total)
    if not pattern and overall < float(sparsity) - tol:
        failing = [f"overall sparsity {overall:.4f} < {float(sparsity):.4f} (tolerance {tol})"]
    return {
        "file": str(path),
        "pattern": nm if pattern else f"{float(sparsity):g} unstructured",
        "checked": chosen,
        "layers": rows,
        "overall_sparsity": overall,
        "failing": failing,
        "ok": not failing,
    }


# --------------------------------------------------------------------------------------------------
# Packed N:M files


def pack_file(path: str | Path, output: str | Path, nm: str | None = None) -> dict[str, Any]:
    """Write the packed N:M form of an exported weights file and measure it against dense.

    Targeted layers are stored as ``<key>.values`` (fp16, N per group) + ``<key>.indices`` (bit-packed
    positions, ceil(log2 M) bits each) + ``<key>.shape``/``<key>.nm``; every other tensor as fp16 (floats)
    or unchanged. Round trip checked: unpacking gives the fp16 weight back exactly.
    """
    path = Path(path)
    tensors, meta = _load_plain(path)
    recipe = _recipe_of(meta)
    nm = nm or (recipe.method.nm if recipe is not None else None)
    if nm is None:
        raise UsageError("the packed form is for N:M weights; this run is unstructured")
    n, m = parse_nm(nm)
    keys, _ = targeted_keys(meta, tensors, m)
    packed_tensors: dict[str, torch.Tensor] = {}
    dense_layer_bytes = packed_layer_bytes = 0
    for key in keys:
        w16 = tensors[key].to(torch.float16)
        packed = pack_nm(w16, n, m)
        if not torch.equal(unpack_nm(packed, torch.float16), w16):
            raise RuntimeError(f"packing round trip failed for {key}")
        for part, t in packed.items():
            packed_tensors[f"{key}.{part}"] = t
        dense_layer_bytes += w16.numel() * 2
        packed_layer_bytes += packed_nbytes(packed)
    for key, t in tensors.items():
        if key not in keys:
            packed_tensors[key] = t.to(torch.float16) if t.is_floating_point() else t
    out_meta = {k: v for k, v in meta.items() if k not in ("aliases", "format_version")}
    out_meta.update({"kind": "packed_nm", "nm": nm, "packed_layers": keys})
    out = save_safetensors(output, packed_tensors, out_meta)
    dense_fp16 = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors.values())
    return {
        "packed_file": str(out),
        "nm": nm,
        "packed_layers": len(keys),
        "layers_dense_fp16_bytes": dense_layer_bytes,
        "layers_packed_bytes": packed_layer_bytes,
        "layers_ratio": packed_layer_bytes / max(1, dense_layer_bytes),
        "expected_ratio": expected_packed_ratio(n, m),
        "file_bytes": out.stat().st_size,
        "dense_fp16_bytes": dense_fp16,
        "dense_file_bytes": path.stat().st_size,
        "file_ratio_vs_fp16": out.stat().st_size / max(1, dense_fp16),
        "roundtrip_exact": True,
    }


# --------------------------------------------------------------------------------------------------
# Export of a run


def export_run(
    run: str | Path, which: str = "best", output: str | Path | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Export a run's checkpoint with the masks folded in, verify it, chart it and (N:M) pack it.

    Writes ``export-<which>.safetensors`` (or ``output``), ``export-<which>.packed.safetensors`` for N:M, and
    ``sparsity.png`` / ``sparsity.json`` next to the export (the run folder by default).
    """
    from evcli import api

    run = Path(run)
    out = Path(output) if output else (run if run.is_dir() else run.parent) / f"export-{which}.safetensors"
    api.check_new_file(out.with_name(out.name.removesuffix(".safetensors") + ".packed.safetensors"), overwrite)
    res = api.export("sparsify", run, which, out, overwrite=overwrite)
    weights = Path(res["weights"])
    meta = read_safetensors(weights, "weights file")[1]
    recipe = _recipe_of(meta)
    if recipe is not None and recipe.method.method == "dense":
        res.update(pattern="dense", verified=True, failing_layers=[], overall_sparsity=0.0, packed=None, chart=None)
        return res
    check = verify_file(weights)
    live = res.get("checkpoint_model_metrics") or {}
    trained_at_pattern = (
        live.get("nm_exact") == 1.0
        if recipe.method.nm
        else live.get("sparsity", 0.0) >= (recipe.method.sparsity or 0.0) - 0.005
    )
    res["trained_at_pattern"] = trained_at_pattern
    if not trained_at_pattern:
        warn(
            f"the exported checkpoint (step {res['step']}) was not trained at {check['pattern']}: the model computed "
            f"{100 * live.get('sparsity', 0.0):.1f}% sparsity there, and the export prunes it without training. "
            "Its accuracy is what the export's metrics say, not what the run reported; export --which last, or "
            "train past the end of the sparsity schedule"
        )
    folder = Path(run) if Path(run).is_dir() else weights.parent
    title = f"{recipe.model.name} {recipe.method.method} {check['pattern']}" if recipe else weights.name
    res.update(write_layer_report(folder, check["layers"], title))
    res["pattern"] = check["pattern"]
    res["verified"] = check["ok"]
    res["failing_layers"] = check["failing"]
    res["overall_sparsity"] = check["overall_sparsity"]
    res["packed"] = None
    if recipe is not None and recipe.method.nm is not None:
        res["packed"] = pack_file(
            weights, weights.with_name(weights.name.removesuffix(".safetensors") + ".packed.safetensors")
        )
    return res


# --------------------------------------------------------------------------------------------------
# Bench


NO_CPU_CLAIM = (
    "no CPU speedup is claimed: PyTorch has no sparse kernel for these layers on CPU, so the sparse model "
    "runs the same dense kernels as the dense one; only size, nonzeros and ideal zero-skipping MACs differ"
)


def _time_ms(model: nn.Module, x: torch.Tensor, sync: Any) -> float:
    """Wall time of one forward pass in milliseconds, device work included."""
    sync()
    t0 = time.perf_counter()
    model(x)
    sync()
    return (time.perf_counter() - t0) * 1e3


def _time_cpu(model: nn.Module, batches: list[int], size: int, iters: int) -> list[dict[str, Any]]:
    """Median CPU latency of the model as exported (folded weights, dense kernels), fp32, per batch size."""
    import statistics

    rows = []
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            for _ in range(2):
                model(x)
            times = [_time_ms(model, x, lambda: None) for _ in range(iters)]
            ms = statistics.median(times)
            rows.append({"batch": batch, "ms": ms, "img_per_s": batch / (ms / 1e3)})
    return rows


def bench_file(
    path: str | Path, batches: list[int], img_size: int | None = None, iters: int = 20, cpu: bool = False
) -> dict[str, Any]:
    """Dense vs sparse on one named runtime.

    CUDA (unless ``cpu``): the targeted Linear layers of a 2:4 file are converted with
    ``torch.sparse.to_sparse_semi_structured`` and both models run in fp16 at every batch size, interleaved;
    rows where sparse is slower say so. CPU: size, nonzeros, MACs and the latency of the exported model (which
    runs the same dense kernels as a dense model would: no speed-up is claimed).
    """
    from evcli.methods.sparsify.layers import select_layers
    from evcli.ops.flops import COUNTER, count_macs

    path = Path(path)
    tensors, meta = _load_plain(path)
    recipe = _recipe_of(meta)
    if recipe is None:
        raise UsageError(f"{path} is not a weights file of an evcli sparsify run (no recipe in its metadata)")
    model = _build_model(recipe, int(meta.get("num_classes") or 10))
    from evcli.io.checkpoint import load_model_weights

    load_model_weights(model, tensors, str(path), strict=True)
    model.eval()
    nm = recipe.method.nm
    pattern = parse_nm(nm) if nm else None
    choice = select_layers(model, recipe.method.targets, recipe.method.ignore, pattern[1] if pattern else None)
    size = img_size or recipe.data.img_size
    macs = count_macs(model, (3, size, size))
    dense_macs = sum(r.macs for r in macs)
    sparse_macs = sum(r.sparse_macs for r in macs)
    params = {k: v for k, v in tensors.items() if v.is_floating_point()}
    targeted = [mod.weight for _, mod in choice.selected]
    result: dict[str, Any] = {
        "file": str(path),
        "model": recipe.model.name,
        "pattern": nm or f"{recipe.method.sparsity:g} unstructured",
        "input": f"1x3x{size}x{size}",
        "file_bytes": path.stat().st_size,
        "weights": sum(v.numel() for v in params.values()),
        "nonzeros": sum(int((v != 0).sum()) for v in params.values()),
        "targeted_weights": sum(w.numel() for w in targeted),
        "targeted_nonzeros": sum(int((w != 0).sum()) for w in targeted),
        "macs_dense": dense_macs,
        "macs_sparse_ideal": sparse_macs,
        "mac_counter": COUNTER,
    }
    if pattern:
        n, m = pattern
        dense16 = sum(w.numel() * 2 for w in targeted)
        packed = sum(packed_nbytes(pack_nm(w.detach().half(), n, m)) for w in targeted)
        result["targeted_packed_ratio_fp16"] = packed / max(1, dense16)
    use_cuda = torch.cuda.is_available() and not cpu
    if not use_cuda:
        result["runtime"] = f"PyTorch {torch.__version__} eager, CPU ({torch.get_num_threads()} threads)"
        result["speed"] = []
        result["cpu_timing"] = _time_cpu(model, batches, size, min(iters, 5))
        result["speed_claim"] = NO_CPU_CLAIM
        return result
    result.update(_bench_cuda(model, choice.selected, pattern, batches, size, iters))
    return result


def _bench_cuda(
    model: nn.Module,
    selected: list[tuple[str, nn.Module]],
    pattern: tuple[int, int] | None,
    batches: list[int],
    size: int,
    iters: int,
) -> dict[str, Any]:
    """fp16 CUDA timing of the dense model against the one with 2:4 semi-structured Linear weights."""
    import copy

    dev = torch.device("cuda")
    dense = model.to(dev).half().eval()
    out: dict[str, Any] = {"runtime": f"PyTorch {torch.__version__} eager, CUDA fp16 ({torch.cuda.get_device_name()})"}
    converted, not_converted = [], []
    sparse = copy.deepcopy(dense)
    if pattern != (2, 4):
        out["speed_claim"] = f"no sparse kernel: torch semi-structured sparsity needs 2:4, this file is {pattern}"
        out["speed"] = []
        return out
    from torch.sparse import to_sparse_semi_structured

    names = {name for name, _ in selected}
    for name, mod in sparse.named_modules():
        if name in names and isinstance(mod, nn.Linear):
            try:
                mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
                converted.append(name)
            except Exception as exc:  # shape or dtype the kernel does not take: stays dense, listed
                not_converted.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    out["converted_linear_layers"] = converted
    out["not_converted"] = not_converted
    if not converted:
        out["speed_claim"] = (
            "no layer runs a sparse kernel: semi-structured 2:4 in PyTorch covers Linear layers only (none "
            "converted); convolutions stay dense, so no speedup is claimed"
        )
        out["speed"] = []
        return out
    rows = []
    sync = torch.cuda.synchronize
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, size, size, device=dev, dtype=torch.float16)
            for _ in range(5):
                dense(x)
                sparse(x)
            d_times, s_times = [], []
            for _ in range(iters):  # interleaved, so drift hits both alike
                d_times.append(_time_ms(dense, x, sync))
                s_times.append(_time_ms(sparse, x, sync))
            d, s = statistics.median(d_times), statistics.median(s_times)
            rows.append({"batch": b, "dense_ms": d, "sparse_ms": s, "speedup": d / s, "sparse_slower": s > d})
    out["speed"] = rows
    slower = [r["batch"] for r in rows if r["sparse_slower"]]
    out["speed_claim"] = (
        f"sparse is slower than dense at batch {', '.join(map(str, slower))}"
        if slower
        else "sparse is faster at every batch"
    ) + f" (only {len(converted)} Linear layers use 2:4 kernels; everything else is dense)"
    return out
