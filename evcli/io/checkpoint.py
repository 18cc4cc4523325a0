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

Every file evcli writes carries ``checksum`` in its metadata (:func:`tensor_checksum`, about 70 ms per
100 MB); reading verifies it when present, so a flipped byte is refused instead of trained on. Files
without one (foreign files, older evcli files) still load. The header of any file handed in is parsed
and checked here (JSON, offsets, dtype/shape against byte lengths, metadata types) before the
safetensors library sees it, so a damaged file is one ``CheckpointError`` line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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

    A kill during the write leaves the previous file intact and at most a stray ``.<name>.XXXXXXXX.tmp``
    file; the next successful write of the same path removes such strays that are older than itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    started_ns = os.fstat(fd).st_mtime_ns  # the file system's clock, as the strays' mtimes are
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
    _remove_stray_temps(path, started_ns)
    return path


def atomic_link_or_copy(source: str | Path, path: str | Path) -> Path:
    """Atomically make ``path`` hold the bytes of ``source``: a hard link where the file system allows one (no
    copy: ``source`` is only ever replaced by rename, never rewritten in place, so the link keeps its bytes),
    otherwise a copy."""

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    return atomic_write(path, write)


def _remove_stray_temps(path: Path, before_ns: int) -> None:
    """Remove ``.<name>.XXXXXXXX.tmp`` files of ``path`` left by killed writes (modified before ``before_ns``).

    A write still in progress keeps touching its temp file, so only temps older than this write go; the
    8 characters are exactly what :func:`tempfile.mkstemp` puts there, so other targets' temps never match.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime_ns < before_ns:
                os.unlink(entry.path)
        except OSError:  # cleaning up is best effort: the write itself succeeded
            pass


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


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over every tensor in sorted name order: its name, a NUL, its byte length (8 bytes,
    little-endian) and its raw bytes. Computed the same way on writing and on reading (after
    ``load_file``), so it checks the stored bytes whatever the machine's byte order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        digest.update(name.encode("utf-8") + b"\0" + len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return "sha256:" + digest.hexdigest()


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write tensors and JSON metadata (tied tensors stored once, ``checksum`` of the tensors)."""
    flat, aliases = _prepare_tensors(tensors)
    meta = {**meta, "format_version": FORMAT_VERSION, "aliases": aliases, "checksum": tensor_checksum(flat)}
    metadata = {META_KEY: json.dumps(meta, default=str)}

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=metadata)

    return atomic_write(path, write)


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Export plain model weights (``kind: weights``)."""
    return save_safetensors(path, state_dict, {**meta, "kind": "weights"})


# --------------------------------------------------------------------------------------------------
# Reading (anything a user hands in goes through check_safetensors_file)


# Bits per element of every safetensors dtype (the format's own table).
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_CONVERT_HINT = (
    'convert it once, where you trust its origin: python -c "import torch, safetensors.torch as s; '
    "s.save_file(torch.load('IN.pth', weights_only=True), 'OUT.safetensors')\""
)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_header(p: Path, what: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor entries and the ``__metadata__`` of a safetensors file, checked against the file's size.

    Mirrors the safetensors library's own validation (tensors tile the data section exactly, in offset
    order) so that whatever passes here loads, and whatever does not gets a message naming the problem.
    """
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(9)
        # A safetensors file starts with its header length (8 bytes, little-endian) and then "{": a length
        # whose low bytes happen to read 0x80 or "PK\x03\x04" is still safetensors when "{" follows.
        if head[8:9] != b"{" and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):
            raise CheckpointError(
                f"{p} looks like a pickle/zip PyTorch file, not safetensors; evcli never unpickles a file",
                hint=_CONVERT_HINT,
            )
        header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if header_len <= 0 or header_len + 8 > size or head[8:9] != b"{":
            raise CheckpointError(f"{p} is not a safetensors file (bad or truncated header)")
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{p} is not a usable safetensors file (a {header_len:,}-byte header, the format allows "
                f"{MAX_HEADER_BYTES:,})"
            )
        fh.seek(8)
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{what} {p} is damaged: its safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} {p} is damaged: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{what} {p} is damaged: its __metadata__ is not a mapping of strings to strings")
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        bad = f"{what} {p} is damaged: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{bad} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            raise CheckpointError(f"{bad} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{bad} has an invalid shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{bad} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin > end or end > data_len:
            raise CheckpointError(
                f"{bad} has data_offsets [{begin}, {end}] out of range (the data section holds {data_len} bytes)"
            )
        bits = math.prod(shape) * _DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise CheckpointError(
                f"{bad}: dtype {dtype} and shape {shape} make {bits / 8:g} bytes, its data_offsets "
                f"[{begin}, {end}] hold {end - begin}"
            )
        spans.append((begin, end, name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CheckpointError(f"{what} {p} is damaged: tensors {previous!r} and {name!r} overlap")
        if begin > position:
            raise CheckpointError(
                f"{what} {p} is damaged: {begin - position} bytes before tensor {name!r} belong to no tensor"
            )
        position, previous = end, name
    if position != data_len:
        raise CheckpointError(
            f"{what} {p} is damaged: {data_len - position} bytes after the last tensor belong to no tensor"
        )
    return header, metadata


def _check_evcli_meta(p: Path, what: str, raw_meta: dict[str, str]) -> dict[str, Any]:
    """The evcli metadata (empty for foreign files), its required keys and their types checked."""
    if META_KEY not in raw_meta:
        return {}
    bad = f"{what} {p} has damaged evcli metadata"
    try:
        meta = json.loads(raw_meta[META_KEY])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{bad}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{bad}: a JSON {type(meta).__name__}, expected an object")
    required = {"kind": str}
    if meta.get("kind") == "training":
        required.update(state=dict, step=int, recipe=dict)
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{bad}: no {', '.join(repr(k) for k in missing)}")
    optional = {
        "aliases": dict,
        "checksum": str,
        "recipe": dict,
        "command": str,
        "best": dict,
        "world_size": int,
        "classes": list,
    }
    nullable = ("recipe", "command", "classes")  # a weights file may say "none" for these
    for key, kind in {**optional, **required}.items():
        value = meta.get(key)
        if value is None and key in nullable and key not in required:
            continue
        if key in meta and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CheckpointError(f"{bad}: {key!r} is {type(value).__name__}, expected {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.get("aliases", {}).items()):
        raise CheckpointError(f"{bad}: 'aliases' is not a mapping of tensor names")
    if meta["kind"] == "training":
        absent = [k for k in ("optimizers", "method") if k not in meta["state"]]
        if absent:
            raise CheckpointError(f"{bad}: its state has no {', '.join(repr(k) for k in absent)}")
    checksum = meta.get("checksum")
    if checksum is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", checksum):
        raise CheckpointError(f"{bad}: unknown checksum {checksum[:40]!r}")
    return meta


def _inspect(path: str | Path, what: str) -> tuple[Path, dict[str, dict[str, Any]], dict[str, Any]]:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what} not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{what} is a directory, expected a .safetensors file: {p}")
    if p.name.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{p} is a pickle-based PyTorch file; evcli loads weights only from .safetensors and never "
            "unpickles a file",
            hint=_CONVERT_HINT,
        )
    try:
        header, raw_meta = _parse_header(p, what)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {p}: {exc.strerror or exc}") from exc
    return p, header, _check_evcli_meta(p, what, raw_meta)


def check_safetensors_file(path: str | Path, what: str = "weights file") -> Path:
    """Make sure ``path`` is a well-formed safetensors file; refuse pickles without opening them.

    Reads only the header (no tensor data, no checksum: :func:`read_safetensors` verifies that).

    Raises:
        CheckpointError: missing file, a pickle-based file, not a safetensors file, a damaged header
            (not JSON, offsets out of range or overlapping, dtype/shape not matching the byte length,
            ``__metadata__`` not strings) or damaged evcli metadata (not an object, required keys missing).
    """
    return _inspect(path, what)[0]


def read_safetensors(path: str | Path, what: str = "weights file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load all tensors and the evcli metadata (empty dict for foreign files) of a safetensors file.

    Raises:
        CheckpointError: everything :func:`check_safetensors_file` refuses, and tensors that do not match
            the checksum written with them.
    """
    p, _, meta = _inspect(path, what)
    try:
        tensors = load_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"cannot read {what} {p}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    if "checksum" in meta and tensor_checksum(tensors) != meta["checksum"]:
        label = "checkpoint" if meta["kind"] == "training" else what
        raise CheckpointError(
            f"{label} {p} is corrupt: its tensors do not match the checksum written with it",
            hint="copy it again from where it came from, or use another checkpoint of the run",
        )
    for dropped, kept in meta.get("aliases", {}).items():
        if kept in tensors:
            tensors[dropped] = tensors[kept]
    if meta.get("kind") == "training":
        missing = sorted(_tensor_refs(meta["state"]) - set(tensors))
        if missing:
            raise CheckpointError(
                f"{what} {p} has damaged evcli metadata: its state names tensors the file does not hold "
                f"({_short(missing)})"
            )
    return tensors, meta


def _tensor_refs(obj: Any) -> set[str]:
    """Every ``{"__tensor__": name}`` placeholder in a state skeleton (see :func:`encode_state`)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return {str(obj["__tensor__"])}
        return set().union(*map(_tensor_refs, obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*map(_tensor_refs, obj)) if obj else set()
    return set()


def read_metadata(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Only the evcli metadata of a safetensors file, checked like :func:`check_safetensors_file` (no tensor
    data read, no checksum: that is :func:`read_safetensors`'s job)."""
    return _inspect(path, what)[2]


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
