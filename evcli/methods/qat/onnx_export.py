"""The int8 QDQ ONNX export of a quantized model, checked against PyTorch with onnxruntime.

ONNX's QuantizeLinear/DequantizeLinear carry 8-bit integers; a b-bit quantizer (b <= 8) fits them exactly: the
weight levels are int8 values, and a b-bit activation is clipped to [Qn·s, Qp·s] before an int8 (signed) or uint8
(unsigned) QuantizeLinear with the same scale, which then rounds to the same levels. So every bit width of evcli
qat exports as standard int8 QDQ (``torch.onnx`` TorchScript exporter, opset 13, per-channel weights allowed).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from evcli.errors import EvcliError, UsageError

OPSET = 13


def _qdq_input(layer: Any, x: torch.Tensor) -> torch.Tensor:
    aq = layer.a_quant
    if aq is None:
        return x
    s = float(aq.step.detach().abs())
    qn, qp = aq.qn_qp
    x = torch.clamp(x, qn * s, qp * s)
    if bool(aq.signed):
        return torch.fake_quantize_per_tensor_affine(x, s, 0, -128, 127)
    return torch.fake_quantize_per_tensor_affine(x, s, 0, 0, 255)


def _qdq_weight(layer: Any) -> torch.Tensor:
    wq = layer.w_quant
    q = layer.int_weight()
    if wq.channels:
        scale = wq.step.detach().abs().float()
        w = q * scale.reshape(-1, *([1] * (q.dim() - 1)))
        zero = torch.zeros(scale.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)
    s = float(wq.step.detach().abs())
    return torch.fake_quantize_per_tensor_affine(q * s, s, 0, -128, 127)


class _QdqForward:
    """Within this context every quantized layer of ``model`` runs its QDQ form (what the ONNX file holds)."""

    def __init__(self, model: nn.Module):
        from evcli.methods.qat.method import quant_layers

        self.layers = [m for _, m in quant_layers(model)]

    def __enter__(self) -> _QdqForward:
        from evcli.methods.qat.quant import QuantConv2d

        for layer in self.layers:
            if isinstance(layer, QuantConv2d):

                def fwd(x: torch.Tensor, layer: Any = layer) -> torch.Tensor:
                    return F.conv2d(
                        _qdq_input(layer, x),
                        _qdq_weight(layer),
                        layer.bias,
                        layer.stride,
                        layer.padding,
                        layer.dilation,
                        layer.groups,
                    )
            else:

                def fwd(x: torch.Tensor, layer: Any = layer) -> torch.Tensor:
                    return F.linear(_qdq_input(layer, x), _qdq_weight(layer), layer.bias)

            layer.forward = fwd
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            del layer.forward


def write_qdq_onnx(
    model: nn.Module, out: Path, recipe: Any, loader: Any, max_batches: int | None = None
) -> dict[str, Any]:
    """Export ``model`` (a quantized classifier, eval mode) to an int8 QDQ ONNX file at ``out`` and compare it
    with the PyTorch fake-quant model on the val data with onnxruntime (max |logit| error, top-1 of both)."""
    if importlib.util.find_spec("onnx") is None:
        raise UsageError("--onnx needs the 'onnx' package", hint='pip install "evcli[onnx]" (onnx, onnxruntime)')
    size = recipe.data.img_size
    example = torch.zeros(2, 3, size, size)
    try:
        with _QdqForward(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(out),
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        out.unlink(missing_ok=True)
        raise UsageError(f"ONNX cannot carry this model: {first}") from exc
    import onnx

    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    res: dict[str, Any] = {
        "file": str(out),
        "opset": OPSET,
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
    }
    if importlib.util.find_spec("onnxruntime") is None or loader is None:
        res.update(
            checked=False, note="not checked: onnxruntime is not installed" if loader is not None else "no val data"
        )
        return res
    import numpy as np
    import onnxruntime as ort

    from evcli.methods.qat.export import compare_models

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.numpy().astype(np.float32)})[0])

    check = compare_models(model, run, loader, max_batches)
    res.update(checked=True, runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider", **check)
    # a rounding tie may land on the other level in another runtime: logits may differ a little, top-1 must not
    if abs(check["top1_reference"] - check["top1_other"]) > max(0.5, 100.0 / max(1, check["images"])):
        raise EvcliError(
            f"the ONNX export does not score like the PyTorch model: top-1 {check['top1_other']:.2f}% vs "
            f"{check['top1_reference']:.2f}% (max logit error {check['max_abs_logit_error']:.3g})"
        )
    return res
