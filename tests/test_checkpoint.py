"""safetensors I/O: atomic writes, tied weights, nested state, pickle refusal, mismatch messages."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from evcli.errors import CheckpointError
from evcli.io.checkpoint import (
    atomic_link_or_copy,
    atomic_write,
    check_safetensors_file,
    decode_state,
    encode_state,
    load_model_weights,
    read_safetensors,
    save_safetensors,
    save_weights,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight


def test_tied_weights_round_trip(tmp_path: Path):
    model = Tied()
    save_weights(tmp_path / "w.safetensors", model.state_dict(), {"note": "tied"})
    tensors, meta = read_safetensors(tmp_path / "w.safetensors")
    assert meta["aliases"] == {"out.weight": "emb.weight"}
    other = Tied()
    load_model_weights(other, tensors, "w", strict=True)
    assert torch.equal(other.emb.weight, model.emb.weight) and other.out.weight is other.emb.weight


def test_nested_state_round_trip():
    opt_state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "fused": None}],
        "inf": float("inf"),
    }
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode_state(opt_state, "state", tensors)
    back = decode_state(skeleton, tensors)
    assert back["state"][0]["step"] is tensors["state.state.0.step"]
    assert back["param_groups"][0]["betas"] == (0.9, 0.99) and back["inf"] == float("inf")
    assert list(back["state"]) == [0]  # integer keys survive JSON


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "last.safetensors"
    save_safetensors(target, {"a": torch.zeros(2)}, {"kind": "training"})
    before = target.read_bytes()

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


@pytest.mark.parametrize("can_link", [True, False])
def test_best_checkpoint_keeps_its_bytes_when_last_is_rewritten(tmp_path: Path, monkeypatch, can_link: bool):
    """best.safetensors is a hard link to last (no copy) or, where links fail, a copy; either way rewriting
    last later leaves best as it was."""
    if not can_link:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links here")))
    last, best = tmp_path / "last.safetensors", tmp_path / "best.safetensors"
    save_safetensors(last, {"a": torch.zeros(2)}, {"kind": "training"})
    atomic_link_or_copy(last, best)
    first = best.read_bytes()
    assert first == last.read_bytes() and os.path.samefile(last, best) == can_link
    save_safetensors(last, {"a": torch.ones(2)}, {"kind": "training"})
    assert best.read_bytes() == first != last.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.safetensors"]


@pytest.mark.parametrize("name", ["model.pth", "model.pt", "model.bin", "model.ckpt", "weights.pth.tar"])
def test_pickle_files_are_refused_without_unpickling(tmp_path: Path, name: str):
    path = tmp_path / name

    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="pickle"):
        read_safetensors(path)
    assert not (tmp_path / "pwned").exists()


def test_pickle_content_with_safetensors_name_is_refused(tmp_path: Path):
    path = tmp_path / "sneaky.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        check_safetensors_file(path)


def test_missing_truncated_and_garbage_files(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        read_safetensors(tmp_path / "nope.safetensors")
    good = tmp_path / "good.safetensors"
    save_weights(good, {"w": torch.ones(100)}, {})
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:60])
    with pytest.raises(CheckpointError):
        read_safetensors(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not tensors")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors(tmp_path / "junk.safetensors")


def test_mismatch_names_the_keys():
    small, big = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(big, small.state_dict(), "small.safetensors", strict=True)
    assert "missing: 1.weight, 1.bias" in info.value.message
    wide = nn.Sequential(nn.Linear(4, 7))
    with pytest.raises(CheckpointError, match=r"0.weight \[7, 4\] vs model \[3, 4\]"):
        load_model_weights(small, wide.state_dict(), "wide", strict=True)
    report = load_model_weights(big, small.state_dict(), "small", strict=False)
    assert report["missing"] == ["1.weight", "1.bias"]
    assert torch.equal(big[0].weight, small[0].weight)


@pytest.mark.parametrize("header_len", [0x80, 0x4B50 + 0x10000])  # low bytes read like a pickle / a zip
def test_safetensors_whose_header_length_looks_like_a_pickle_or_zip(tmp_path: Path, header_len: int):
    import json as _json
    import struct

    header = _json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (header_len - len(header))  # safetensors allows padding the header with spaces
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + header + struct.pack("<f", 1.5))
    tensors, _ = read_safetensors(path)
    assert tensors["w"].item() == 1.5
