"""safetensors checkpoints: atomic writes, full training state as tensors + JSON, safe user weights.

Layout of a training checkpoint (``checkpoints/last.safetensors``, ``best.safetensors``):

* tensors ``model.<param>``, ``ema.<param>`` (when EMA is on), ``state.<path>`` for every tensor
  in the optimizer / scheduler / method state (Adam moments, masks, scores, counters);
* metadata key ``evcli``: JSON with ``kind: "training"``, the resolved recipe, step, epoch, the best
  metric so far, the non-tensor parts of the state (with ``{"__tensor__": name}`` placeholders),
  and ``aliases`` for tied weights stored once.

An exported weights file (``final.safetensors``) holds the plain ``state_dict`` keys and metadata with
``kind: "weights"``, so ``safetensors.torch.load_file`` + ``model.load_state_dict`` work outside
evcli. Nothing is ever unpickled: a ``.pt``/``.pth``/``.bin`` file is refused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evcli.errors import CheckpointError

FORMAT_VERSION = 1
META_KEY = "evcli"
_UMASK = os.umask(0)
os.umask(_UMASK)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar", ".th", ".model")


# --------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write a file through ``write(tmp_path)`` then rename it into place.

    A kill during the write leaves the previous file intact and at most a stray ``.tmp`` file that
    the next successful write of the same path replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# Nested state <-> tensors + JSON


def encode_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested state into ``tensors`` and return a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, encode_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: decode_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Writing


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once (``aliases``: dropped name -> kept name) and make the rest savable."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[int, int] = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.numel() > 0:
            key = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            ptr = t.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1
        out[name] = t
    # Distinct views of one storage (not plain ties) must become separate buffers for safetensors.
    shared = {p for p, n in storages.items() if n > 1}
    for name, t in out.items():
        if t.numel() > 0 and t.untyped_storage().data_ptr() in shared:
            out[name] = t.clone()
    return {k: v.contiguous().cpu() for k, v in out.items()}, aliases


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write tensors and JSON metadata (tied tensors stored once)."""
    flat, aliases = _prepare_tensors(tensors)
    meta = {**meta, "format_version": FORMAT_VERSION, "aliases": aliases}
    metadata = {META_KEY: json.dumps(meta, default=str)}

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=metadata)

    return atomic_write(path, write)


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Export plain model weights (``kind: weights``)."""
    return save_safetensors(path, state_dict, {**meta, "kind": "weights"})


# --------------------------------------------------------------------------------------------------
# Reading (anything a user hands in goes through check_safetensors_file)


def check_safetensors_file(path: str | Path, what: str = "weights file") -> Path:
    """Make sure ``path`` is a readable safetensors file; refuse pickles without opening them.

    Raises:
        CheckpointError: missing file, a pickle-based file, or not a safetensors file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what} not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{what} is a directory, expected a .safetensors file: {p}")
    name = p.name.lower()
    convert_hint = (
        'convert it once, where you trust its origin: python -c "import torch, safetensors.torch as s; '
        "s.save_file(torch.load('IN.pth', weights_only=True), 'OUT.safetensors')\""
    )
    if name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{p} is a pickle-based PyTorch file; evcli loads weights only from .safetensors and never "
            "unpickles a file",
            hint=convert_hint,
        )
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(9)
    # A safetensors file starts with its header length (8 bytes, little-endian) and then "{": a length whose
    # low bytes happen to read 0x80 or "PK\x03\x04" is still safetensors when "{" follows.
    if head[8:9] != b"{" and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{p} looks like a pickle/zip PyTorch file, not safetensors; evcli never unpickles a file",
            hint=convert_hint,
        )
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if header_len <= 0 or header_len + 8 > size or head[8:9] != b"{":
        raise CheckpointError(f"{p} is not a safetensors file (bad or truncated header)")
    return p


def read_safetensors(path: str | Path, what: str = "weights file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load all tensors and the evcli metadata (empty dict for foreign files) of a safetensors file."""
    p = check_safetensors_file(path, what)
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
        tensors = load_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"cannot read {what} {p}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    meta: dict[str, Any] = {}
    if META_KEY in raw_meta:
        try:
            meta = json.loads(raw_meta[META_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p} has corrupt evcli metadata") from exc
    for dropped, kept in meta.get("aliases", {}).items():
        if kept in tensors:
            tensors[dropped] = tensors[kept]
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Only the evcli metadata of a safetensors file (no tensor data read)."""
    p = check_safetensors_file(path, "checkpoint")
    with safe_open(str(p), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def model_weights_from(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "module.model."
) -> dict[str, torch.Tensor]:
    """The model's state dict inside a training checkpoint, or the file itself for a weights file."""
    if meta.get("kind") == "training":
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def _short(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_model_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True
) -> dict[str, list[str]]:
    """Load ``state`` into ``model``, naming every mismatch instead of failing obscurely.

    Args:
        model: the target model.
        state: tensors by state-dict key.
        source: shown in messages (the file path).
        strict: raise on any missing, unexpected or mis-shaped key; otherwise load what fits.

    Returns:
        The lists ``missing``, ``unexpected`` and ``mismatched`` (empty when everything fit).

    Raises:
        CheckpointError: strict and the weights do not fit the model.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if mismatched:
            parts.append(f"shape mismatch: {_short(mismatched, 3)}")
        if missing:
            parts.append(f"missing: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_short(unexpected)}")
        raise CheckpointError(
            f"{source} does not fit this model ({'; '.join(parts)})",
            hint="is it a checkpoint of another architecture? set model.weights_strict=false to load "
            "only the keys that fit",
        )
    bad_shape = {m.split(" ")[0] for m in mismatched}
    fitting = {k: v for k, v in state.items() if k in own and k not in bad_shape}
    with torch.no_grad():
        model.load_state_dict(fitting, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
