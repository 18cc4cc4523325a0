"""Run safety (issue 11): files a user hands in never produce a traceback, files evcli writes are verifiable.

Damaged safetensors headers and evcli metadata, the tensor checksum (a flipped byte refused on resume, eval
and export), stray temp files of killed writes, EXIF orientation and decompression bombs, given directly
(``evcli deshadow IMAGE``) and inside ``--data`` folders (read in the main process and in DataLoader workers).
"""

from __future__ import annotations

import json
import os
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from evcli.data.classification import FolderSource
from evcli.errors import CheckpointError, DataError, UsageError
from evcli.io import checkpoint
from evcli.io.checkpoint import read_metadata, read_safetensors, save_safetensors, save_weights
from evcli.io.images import load_rgb, verify_image
from evcli.testing import TINY_ARGS, make_image_folder, run_cli

# --------------------------------------------------------------------------------------------------
# helpers


def _safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file built by hand: 8-byte little-endian header length, the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _f32(name: str, n: int, begin: int = 0) -> dict:
    return {name: {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}}


def _meta(evcli: object) -> dict:
    return {"__metadata__": {"evcli": evcli if isinstance(evcli, str) else json.dumps(evcli)}}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _one_error(r, code: int = 3) -> str:  # noqa: ANN001
    """The run failed with ``code``, one error line and no traceback; returns that line."""
    assert r.code == code, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = _errors(r.stderr)
    assert len(errors) == 1, r.stderr
    return errors[0]


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` RGB (valid CRCs, almost no pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _exif_rotated(path: Path, width: int = 40, height: int = 20) -> Path:
    """An image stored ``width`` x ``height`` (left quarter white, rest black) with EXIF orientation 6: viewers
    rotate it 90 degrees clockwise, so it shows ``height`` x ``width`` with the white part on top."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 4] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def _photo(path: Path, size: tuple[int, int] = (40, 32)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 220, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# damaged safetensors files: one line, exit 3, on every command that reads one


GOOD_W = _f32("w", 2)
DAMAGED = {
    "header-not-json": (_safetensors(b'{"w": {"dtype": "F32", oops', b"\0" * 8), "not valid JSON"),
    "offsets-out-of-range": (_safetensors(_f32("w", 4), b"\0" * 8), "out of range"),
    "offsets-overlap": (_safetensors({**_f32("a", 2), **_f32("b", 1, begin=4)}, b"\0" * 8), "overlap"),
    "dtype-shape-vs-bytes": (
        _safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "make 12 bytes",
    ),
    "unknown-dtype": (_safetensors({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "F33"),
    "metadata-not-strings": (
        _safetensors({"__metadata__": {"evcli": {"kind": "weights"}}, **GOOD_W}, b"\0" * 8),
        "__metadata__",
    ),
    "evcli-meta-not-json": (_safetensors({**_meta("{oops"), **GOOD_W}, b"\0" * 8), "not valid JSON"),
    "evcli-meta-a-list": (_safetensors({**_meta([1, 2]), **GOOD_W}, b"\0" * 8), "expected an object"),
    "evcli-meta-no-kind": (_safetensors({**_meta({"step": 1}), **GOOD_W}, b"\0" * 8), "no 'kind'"),
    "training-meta-missing-keys": (
        _safetensors({**_meta({"kind": "training", "step": 1}), **GOOD_W}, b"\0" * 8),
        "no 'state', 'recipe'",
    ),
    "weights-recipe-not-a-dict": (
        _safetensors({**_meta({"kind": "weights", "recipe": [1]}), **GOOD_W}, b"\0" * 8),
        "'recipe' is list",
    ),
    "training-step-not-int": (
        _safetensors(
            {
                **_meta({"kind": "training", "step": "x", "recipe": {}, "state": {"optimizers": {}, "method": {}}}),
                **GOOD_W,
            },
            b"\0" * 8,
        ),
        "'step' is str",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_safetensors_is_one_line_for_eval_and_weights(tmp_path: Path, case: str):
    raw, reason = DAMAGED[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw)
    with pytest.raises(CheckpointError, match="bad.safetensors") as info:
        read_safetensors(bad)
    assert reason in info.value.message and "\n" not in info.value.message
    for args in (
        ["mix", "eval", str(bad)],
        ["mix", *TINY_ARGS, "--weights", str(bad), "-o", str(tmp_path / "run")],
    ):
        r = run_cli(args)
        assert r.code == 3 and "Traceback" not in r.stderr, r.stderr
        first = r.stderr.strip().splitlines()[0]
        assert first.startswith("error:") and str(bad) in first and reason in first, r.stderr
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_damaged_safetensors_for_export_deshadow_eval_and_init_from(tmp_path: Path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(DAMAGED["training-meta-missing-keys"][0])
    for args in (
        ["mix", "export", str(bad)],
        ["deshadow", "eval", str(bad)],
        ["mix", *TINY_ARGS, "--init-from", str(bad), "-o", str(tmp_path / "run")],
    ):
        line = _one_error(run_cli(args))
        assert "no 'state', 'recipe'" in line and str(bad) in line


def test_well_formed_files_still_load(tmp_path: Path):
    # an empty file body, padding spaces in the header, every byte size of dtype, 0-d and empty tensors
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor(3, dtype=torch.int64),
        "c": torch.zeros(0, 4, dtype=torch.bfloat16),
        "d": torch.tensor([True, False]),
        "e": torch.ones(3, dtype=torch.float16),
    }
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, foreign, metadata={"format": "pt"})
    back, meta = read_safetensors(foreign)
    assert meta == {} and all(torch.equal(back[k], v) for k, v in tensors.items())
    (tmp_path / "empty.safetensors").write_bytes(_safetensors(b"{}  "))
    assert read_safetensors(tmp_path / "empty.safetensors") == ({}, {})
    # an evcli file of before the checksum (or whose checksum a tool dropped) still loads
    ours = tmp_path / "ours.safetensors"
    save_weights(ours, tensors, {})
    meta = read_metadata(ours)
    del meta["checksum"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(ours), old, metadata={"evcli": json.dumps(meta)})
    assert torch.equal(read_safetensors(old)[0]["a"], tensors["a"])


# --------------------------------------------------------------------------------------------------
# checksum


def test_written_files_carry_a_checksum_that_catches_one_flipped_byte(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"w": torch.randn(64, 8), "b": torch.zeros(8, dtype=torch.bfloat16)}, {})
    meta = read_metadata(path)
    assert meta["checksum"].startswith("sha256:") and len(meta["checksum"]) == 7 + 64
    read_safetensors(path)  # intact: loads
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # one bit of the tensor data
    path.write_bytes(bytes(raw))
    assert read_metadata(path)["checksum"] == meta["checksum"]  # the header is untouched, and cheap to read
    with pytest.raises(CheckpointError) as info:
        read_safetensors(path, "weights file")
    assert info.value.message == (
        f"weights file {path} is corrupt: its tensors do not match the checksum written with it"
    )


def test_read_metadata_does_not_hash_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = save_safetensors(tmp_path / "c.safetensors", {"w": torch.ones(4)}, {"kind": "weights"})

    def no_hashing(tensors: dict) -> str:
        raise AssertionError("read_metadata hashed the tensors")

    monkeypatch.setattr(checkpoint, "tensor_checksum", no_hashing)
    assert read_metadata(path)["kind"] == "weights"


def test_flipped_byte_in_a_checkpoint_is_refused_on_resume_eval_and_export(tmp_path: Path):
    run = tmp_path / "run"
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "1", "-o", str(run)])
    assert r.code == 0, r.stderr
    last, final = run / "checkpoints" / "last.safetensors", run / "final.safetensors"
    final_before = final.read_bytes()
    raw = bytearray(last.read_bytes())
    raw[len(raw) - len(raw) // 3] ^= 0x40  # inside the tensor data, past the header
    last.write_bytes(bytes(raw))
    for args in (
        ["mix", "--resume", str(run)],
        ["mix", "eval", str(last)],
        ["mix", "export", str(run), "--which", "last", "-o", str(tmp_path / "x.safetensors")],
    ):
        line = _one_error(run_cli(args))
        assert line == f"error: checkpoint {last} is corrupt: its tensors do not match the checksum written with it"
    assert final.read_bytes() == final_before
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# stray temp files of killed writes


def test_next_write_removes_older_stray_temps_of_the_same_file(tmp_path: Path):
    target = tmp_path / "last.safetensors"
    old = time.time() - 3600
    stray = tmp_path / ".last.safetensors.k1ll3d_x.tmp"  # a write killed an hour ago
    other = tmp_path / ".last.safetensors.x.abcdefgh.tmp"  # a temp of another file, last.safetensors.x
    unrelated = tmp_path / ".best.safetensors.abcdefgh.tmp"
    for p in (stray, other, unrelated):
        p.write_bytes(b"half written")
        os.utime(p, (old, old))
    in_progress = tmp_path / ".last.safetensors.zzzzzzzz.tmp"  # a concurrent write, newer than ours
    in_progress.write_bytes(b"still writing")
    later = time.time() + 3600
    os.utime(in_progress, (later, later))
    save_safetensors(target, {"a": torch.zeros(2)}, {"kind": "weights"})
    assert not stray.exists()
    assert other.exists() and unrelated.exists() and in_progress.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.safetensors", other.name, unrelated.name, in_progress.name]
    )


# --------------------------------------------------------------------------------------------------
# images: EXIF orientation


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str):
    img = load_rgb(_exif_rotated(tmp_path / f"p{suffix}"))
    arr = np.asarray(img).astype(float)
    assert img.size == (20, 40)  # shown portrait, as a viewer shows it
    assert arr[:8].mean() > 200 and arr[12:].mean() < 30  # the white quarter is on top


def test_deshadow_photo_with_exif_orientation_and_a_mask_drawn_on_it(tmp_path: Path):
    photo = _exif_rotated(tmp_path / "portrait.jpg")
    mask = tmp_path / "mask.png"
    drawn = np.zeros((40, 20), np.uint8)  # drawn over the upright (20 x 40) picture
    drawn[:10] = 255
    Image.fromarray(drawn).save(mask)
    out = tmp_path / "out.png"
    r = run_cli(["deshadow", str(photo), "--method", "identity", "--mask", str(mask), "-o", str(out), "--no-compare"])
    assert r.code == 0, r.stderr
    assert "resized" not in r.stderr  # the mask fits the upright photo
    result = Image.open(out)
    assert result.size == (20, 40) and np.asarray(result)[:8].mean() > 200


def test_folder_source_reads_exif_rotated_images_upright(tmp_path: Path):
    root = make_image_folder(tmp_path / "data")
    rotated = root / "train" / "class_0" / "000.png"
    _exif_rotated(rotated, width=16, height=8)
    source = FolderSource(root / "train")
    assert source.load(source.paths.index(rotated)).size == (8, 16)


# --------------------------------------------------------------------------------------------------
# images: decompression bombs and the pixel limit


def test_bomb_header_is_refused_before_decoding(tmp_path: Path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(60000, 60000))
    assert bomb.stat().st_size < 200
    with pytest.raises(DataError) as info:
        load_rgb(bomb)
    msg = info.value.message
    assert str(bomb) in msg and "60000x60000" in msg and "178,956,970" in msg and "EVCLI_MAX_IMAGE_PIXELS" in msg
    assert "EVCLI_MAX_IMAGE_PIXELS=3600000000" in info.value.hint
    assert "over the limit" in verify_image(bomb)


def test_pillow_global_limit_neither_warns_nor_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = _photo(tmp_path / "x.png", (16, 16))
    for pil_limit in (200, 100):  # 256 pixels: Pillow alone would warn (> 200), then raise (> 2 x 100)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_rgb(path).size == (16, 16)
            assert verify_image(path) is None
        assert Image.MAX_IMAGE_PIXELS == pil_limit  # restored


def test_limit_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = _photo(tmp_path / "x.png", (40, 32))
    monkeypatch.setenv("EVCLI_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(DataError, match=r"40x32 = 1,280 pixels, over the limit of 1,000 set by EVCLI_MAX_IMAGE"):
        load_rgb(path)
    monkeypatch.setenv("EVCLI_MAX_IMAGE_PIXELS", "1280")
    assert load_rgb(path).size == (40, 32)
    monkeypatch.setenv("EVCLI_MAX_IMAGE_PIXELS", "0")  # no limit
    assert load_rgb(path).size == (40, 32)
    monkeypatch.setenv("EVCLI_MAX_IMAGE_PIXELS", "lots")  # the setting is wrong, not the image: not skipped
    with pytest.raises(UsageError, match="EVCLI_MAX_IMAGE_PIXELS must be a whole number"):
        verify_image(path)


def test_deshadow_refuses_bombs_and_oversized_images_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(60000, 60000))
    photo = _photo(tmp_path / "photo.png")
    for args in (["deshadow", str(bomb)], ["deshadow", str(photo), "--mask", str(bomb)]):
        r = run_cli([*args, "--method", "identity", "-o", str(tmp_path / "out.png")])
        line = _one_error(r)
        assert str(bomb) in line and "60000x60000" in line and "DecompressionBomb" not in r.stderr
    assert not (tmp_path / "out.png").exists()
    monkeypatch.setenv("EVCLI_MAX_IMAGE_PIXELS", "1000")
    line = _one_error(run_cli(["deshadow", str(photo), "--method", "identity"]))
    assert str(photo) in line and "40x32" in line and "limit of 1,000" in line
    monkeypatch.setenv("EVCLI_MAX_IMAGE_PIXELS", "lots")
    line = _one_error(run_cli(["deshadow", str(photo), "--method", "identity"]), code=2)
    assert "EVCLI_MAX_IMAGE_PIXELS must be a whole number" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_bomb_inside_a_data_folder_is_one_line(tmp_path: Path, workers: int):
    # 8 train images = one batch of 8: the single step reads every one of them
    root = make_image_folder(tmp_path / "data", classes=2, per_class=4, val_per_class=1)
    bomb = root / "train" / "class_1" / "002.png"
    bomb.write_bytes(_png_claiming(60000, 60000))
    args = [*TINY_ARGS, "--workers", str(workers), "--max-steps", "1", "--data", str(root)]
    r = run_cli(["mix", *args, "-o", str(tmp_path / "run")])
    line = _one_error(r)
    assert str(bomb) in line and "60000x60000" in line and "DecompressionBomb" not in r.stderr
    skipping = FolderSource(root / "train", skip_corrupt=True)  # data.skip_corrupt=true skips it
    assert bomb not in skipping.paths and len(skipping.paths) == 7


def test_lowered_limit_reaches_dataloader_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=4, val_per_class=1)
    big = _photo(root / "train" / "class_0" / "001.png", (64, 48))
    monkeypatch.setenv("EVCLI_MAX_IMAGE_PIXELS", "1000")  # the 16 x 16 images pass, the 64 x 48 one does not
    args = [*TINY_ARGS, "--workers", "1", "--max-steps", "1", "--data", str(root)]
    line = _one_error(run_cli(["mix", *args, "-o", str(tmp_path / "run")]))
    assert str(big) in line and "64x48 = 3,072 pixels, over the limit of 1,000" in line
