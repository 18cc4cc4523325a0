"""Run safety: a run claims its folder alone, nothing a user has is overwritten, preemption saves the run,
``--resume auto`` serves the first start and every requeue, and a mistake prints its error first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from evcli import api
from evcli.errors import EXIT_PREEMPTED
from evcli.testing import TINY_ARGS, TINY_FLAGS, make_image_folder, run_cli


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "done"
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "2", "-o", str(run)])
    assert r.code == 0, r.stderr
    return run


def _first_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.strip())


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # the same second
    flags = {**TINY_FLAGS, "schedule.max_steps": 1}
    a = api.train(api.resolve("mix", flags={**flags, "train.seed": 1}))
    b = api.train(api.resolve("mix", flags={**flags, "train.seed": 2}))
    assert a["run_dir"] != b["run_dir"] and b["run_dir"].endswith("-2")
    for report, seed in ((a, 1), (b, 2)):
        meta = json.loads((Path(report["run_dir"]) / "env.json").read_text())
        assert meta["seed"] == seed
        lines = (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["split"] for x in lines] == ["train", "val"]  # one run's records: nobody else wrote


def test_out_at_a_folder_with_user_files_is_refused_and_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "final.safetensors").write_bytes(b"my precious weights")
    r = run_cli(["mix", *TINY_ARGS, "-o", str(folder)])
    assert r.code == 2 and _first_line(r.stderr).startswith("error:") and "not empty" in r.stderr
    assert (folder / "final.safetensors").read_bytes() == b"my precious weights"
    assert sorted(p.name for p in folder.iterdir()) == ["final.safetensors"]


def test_out_at_a_finished_run_is_refused(done_run: Path) -> None:
    before = (done_run / "final.safetensors").read_bytes()
    r = run_cli(["mix", *TINY_ARGS, "-o", str(done_run)])
    assert r.code == 2 and "already holds a run" in r.stderr and "--resume" in r.stderr
    assert (done_run / "final.safetensors").read_bytes() == before


def test_a_mistake_prints_its_error_first_and_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "never"
    r = run_cli(["mix", *TINY_ARGS, "--data", str(tmp_path / "nothing"), "-o", str(out)])
    assert r.code == 3
    assert _first_line(r.stderr).startswith("error:") and "run folder" not in r.stderr
    assert not out.exists()


def test_resume_with_another_out_is_refused(done_run: Path, tmp_path: Path) -> None:
    r = run_cli(["mix", "--resume", str(done_run), "-o", str(tmp_path / "elsewhere")])
    assert r.code == 2 and "cannot move it" in r.stderr and not (tmp_path / "elsewhere").exists()


def test_a_run_in_use_cannot_be_resumed_twice(done_run: Path) -> None:
    import fcntl

    fd = os.open(done_run / ".evcli-run", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
    try:
        r = run_cli(["mix", "--resume", str(done_run)])
    finally:
        os.close(fd)
    assert r.code == 2 and "in use by another evcli process" in r.stderr


def test_crashed_run_without_checkpoint_needs_resume_auto_to_start_over(tmp_path: Path) -> None:
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / ".evcli-run").write_text("{}")
    (crashed / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n{"step": 2, "spl')
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "1", "-o", str(crashed)])
    assert r.code == 2 and "stopped before its first checkpoint" in r.stderr and "--resume auto" in r.stderr
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "1", "--resume", "auto", "-o", str(crashed)])
    assert r.code == 0, r.stderr
    records = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1] and records[0]["loss"] != 9.0


def test_outputs_never_replace_an_input_or_an_existing_file(tmp_path: Path, done_run: Path) -> None:
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 32), (120, 90, 60)).save(photo)
    original = photo.read_bytes()
    for extra in ([], ["--overwrite"]):
        r = run_cli(["deshadow", str(photo), "-o", str(photo), *extra])
        assert r.code == 2 and "one of the inputs" in r.stderr and photo.read_bytes() == original
    r = run_cli(["deshadow", str(photo)])
    assert r.code == 0, r.stderr
    result = tmp_path / "photo_deshadow.png"
    first = result.read_bytes()
    result.write_bytes(b"edited by the user")
    r = run_cli(["deshadow", str(photo)])
    assert r.code == 2 and "already exists" in r.stderr and result.read_bytes() == b"edited by the user"
    r = run_cli(["deshadow", str(photo), "--overwrite"])
    assert r.code == 0 and result.read_bytes() == first

    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    r = run_cli(["mix", "export", str(done_run), "-o", str(existing)])
    assert r.code == 2 and "already exists" in r.stderr and existing.read_text() == "keep me"
    final = (done_run / "final.safetensors").read_bytes()
    r = run_cli(["mix", "export", str(done_run), "-o", str(done_run / "final.safetensors")])
    assert r.code == 2 and (done_run / "final.safetensors").read_bytes() == final
    r = run_cli(
        ["mix", "export", str(done_run), "-o", str(done_run / "checkpoints" / "last.safetensors"), "--overwrite"]
    )
    assert r.code == 2 and "one of the inputs" in r.stderr
    r = run_cli(["mix", "export", str(done_run), "-o", str(existing), "--overwrite"])
    assert r.code == 0 and load_file(str(existing))


def test_sigterm_saves_a_checkpoint_and_resume_auto_continues(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=40, size=16)
    run = tmp_path / "preempted"
    args = [*TINY_ARGS, "--max-steps", "60", "--epochs", "100", "--data", str(data), "-o", str(run)]
    args += ["--resume", "auto"]
    env = {**os.environ, "EVCLI_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evcli", "mix", *args], stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert code == EXIT_PREEMPTED, "".join(lines) + rest
    assert "preempted (SIGTERM)" in rest and "Traceback" not in rest
    from evcli.io.checkpoint import read_metadata

    step = read_metadata(run / "checkpoints" / "last.safetensors")["step"]
    assert 2 <= step < 60
    # the same command line again (a requeue) continues from that checkpoint to the end
    r = run_cli(["mix", *args])
    assert r.code == 0, r.stderr
    assert f"resume: step {step}/60" in r.stderr and json.loads((run / "report.json").read_text())["steps"] == 60
