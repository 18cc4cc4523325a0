"""The command line: fast --help, exit codes and one-line errors for bad input, env, recipe commands."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from evcli.testing import TINY_ARGS, imports_torch, make_image_folder, run_cli


@pytest.mark.parametrize("args", [["--help"], ["mix", "--help"], ["recipe", "--help"], ["recipe", "list"]])
def test_help_does_not_import_torch(args: list[str]):
    imported, out = imports_torch(args)
    assert not imported
    assert "Usage" in out or "recipes" in out


def test_completion_does_not_import_torch():
    imported, out = imports_torch(
        [], env={"_EVCLI_COMPLETE": "complete_bash", "COMP_WORDS": "evcli mi", "COMP_CWORD": "1"}
    )
    assert not imported
    assert "mix" in out


def test_version_and_env_json():
    r = run_cli(["--version"])
    assert r.code == 0 and r.stdout.startswith("evcli ")
    r = run_cli(["env", "--json"])
    info = json.loads(r.stdout)
    assert r.code == 0 and info["torch"].startswith("2.") and "cuda_available" in info


def test_recipe_commands(tmp_path: Path):
    r = run_cli(["recipe", "list", "--json"])
    names = [x["name"] for x in json.loads(r.stdout)["recipes"]]
    assert "mix/quickstart" in names and "mix/tiny" in names
    r = run_cli(["recipe", "show", "mix/tiny", "--set", "optim.lr=1e-4", "--json"])
    shown = json.loads(r.stdout)
    assert r.code == 0 and shown["optim"]["lr"] == 1e-4 and shown["model"]["name"] == "test_vit"
    bad = tmp_path / "bad.yaml"
    bad.write_text("command: mix\noptim: {lrr: 1}\n")
    r = run_cli(["recipe", "validate", "mix/tiny", str(bad)])
    assert r.code == 2 and "ok      mix/tiny" in r.stdout and "did you mean 'optim.lr'" in r.stderr


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad")
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "val").mkdir()
    corrupt = make_image_folder(root / "corrupt")
    (corrupt / "train" / "class_0" / "001.png").write_bytes(b"not an image at all")
    (root / "weights.pth").write_bytes(pickle.dumps({"w": 1}))
    save_file(
        {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, str(root / "resnet.safetensors")
    )
    (root / "typo.yaml").write_text("command: mix\ntrain: {sed: 1}\n")
    (root / "wrongtype.yaml").write_text("command: mix\ndata: {batch_size: big}\n")
    return {
        "root": root,
        "empty": root / "empty",
        "corrupt": corrupt,
        "pickle": root / "weights.pth",
        "resnet": root / "resnet.safetensors",
        "typo": root / "typo.yaml",
        "wrongtype": root / "wrongtype.yaml",
    }


BAD_INPUT = [
    # (args, exit code, text in the error)
    (["bogus"], 2, "No such command"),
    (["mix", "--epochz", "3"], 2, "No such option"),
    (["mix", "--epochs", "three"], 2, "Invalid value for '--epochs'"),
    (["mix", "--set", "optim.lrr=1"], 2, "unknown recipe key 'optim.lrr' in --set (did you mean 'optim.lr'?)"),
    (["mix", "--set", "optim.lr=fast"], 2, "expected a number, got the string 'fast'"),
    (["mix", "--recipe", "{typo}"], 2, "unknown recipe key 'train.sed'"),
    (["mix", "--recipe", "{wrongtype}"], 2, "expected an integer, got the string 'big'"),
    (["mix", "--recipe", "no/such/recipe"], 2, "recipe not found"),
    (["mix", "--data", "{root}/nowhere"], 3, "data folder not found"),
    (["mix", "--data", "{empty}"], 3, "no class folders"),
    (["mix", "--data", "{corrupt}", "--max-steps", "6"], 3, "corrupt or unreadable image"),
    (["mix", "--weights", "{root}/missing.safetensors"], 3, "weights file not found"),
    (["mix", "--weights", "{pickle}"], 3, "pickle-based PyTorch file"),
    (["mix", "--weights", "{resnet}"], 3, "does not fit this model"),
    (["mix", "--resume", "{root}/no_run"], 3, "run folder not found"),
    (["mix", "--model", "deit_tiny_patch16"], 2, "did you mean: deit_tiny_patch16_224"),
    (["mix", "--mixed-precision", "fp16"], 4, "fp16 needs a CUDA device"),
    (["mix", "-b", "7"], 2, "even batch size"),
]


@pytest.mark.parametrize(("args", "code", "text"), BAD_INPUT, ids=[" ".join(a[:3]) for a, _, _ in BAD_INPUT])
def test_bad_input_one_line_and_exit_code(
    files: dict[str, Path], tmp_path: Path, args: list[str], code: int, text: str
):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    out = tmp_path / "run"
    if args[0] == "mix" and "--resume" not in args and "--recipe" not in args:
        # the tiny settings first: the flag under test comes later and wins (the last value counts)
        args = ["mix", *TINY_ARGS, "-o", str(out), *args[1:]]
    r = run_cli(args)
    assert r.code == code, r.stderr
    assert text in r.stderr
    assert "Traceback" not in r.stderr
    if code != 2 or "Usage:" not in r.stderr:
        errors = [line for line in _error_lines(r.stderr) if line.startswith("error:")]
        assert len(errors) == 1, r.stderr
    if "corrupt" in text:  # found while training: the run had started, but no checkpoint was written
        assert not list(out.rglob("*.safetensors")) and not list(out.rglob("*.tmp"))
        assert "data.skip_corrupt=true" in r.stderr  # the hint of a training folder
    else:  # found before the first step: no run folder at all
        assert not out.exists()


def test_corrupt_image_named_from_worker_process(files: dict[str, Path], tmp_path: Path):
    r = run_cli(
        [
            "mix",
            *TINY_ARGS,
            "--data",
            str(files["corrupt"]),
            "--workers",
            "1",
            "--max-steps",
            "6",
            "-o",
            str(tmp_path / "w"),
        ]
    )
    assert r.code == 3, r.stderr
    line = [x for x in _error_lines(r.stderr) if x.startswith("error:")][0]
    assert "001.png" in line and "Traceback" not in r.stderr


def test_skip_corrupt_trains(files: dict[str, Path], tmp_path: Path):
    r = run_cli(
        [
            "mix",
            *TINY_ARGS,
            "--data",
            str(files["corrupt"]),
            "--skip-corrupt",
            "-b",
            "4",
            "--max-steps",
            "2",
            "-o",
            str(tmp_path / "s"),
            "--json",
        ]
    )
    assert r.code == 0, r.stderr
    assert "skipping corrupt image" in r.stderr and "001.png" in r.stderr


def test_debug_shows_traceback(monkeypatch: pytest.MonkeyPatch):
    from evcli.errors import RecipeError

    monkeypatch.setenv("EVCLI_DEBUG", "1")
    with pytest.raises(RecipeError):
        run_cli(["mix", "--set", "optim.lrr=1"])


def test_help_paragraphs_are_unwrapped(monkeypatch):
    """Hard-wrapped help paragraphs print as flowing text (Typer keeps single newlines), examples keep their lines."""
    from evcli.cli.app import unwrap_help

    text = "Summary line\nwrapped.\n\nA paragraph\nover two lines.\n- item one\n- item two\n\n  evcli a\n  evcli b"
    assert unwrap_help(text) == (
        "Summary line wrapped.\n\nA paragraph over two lines.\n- item one\n- item two\n\n  evcli a\n  evcli b"
    )
    monkeypatch.setenv("COLUMNS", "200")
    r = run_cli(["sparsify", "--help"])
    assert r.code == 0
    assert "with N:M, layers whose input channels do not divide by M" in r.stdout  # one line at 200 columns


def test_sparsify_quotes_a_recorded_dense_reference_for_the_same_setting_only():
    from evcli.cli.common import budget_setting, dense_reference_rows
    from evcli.recipe import resolve_recipe

    recipe = resolve_recipe("sparsify", flags={"sparsify.nm": "2:4", "model.name": "resnet50"})
    refs = json.loads((Path(__file__).parents[1] / "evcli/data/builtin_references.json").read_text())
    report = {"data": "built-in digits (scikit-learn's digits)", "method": "lbc"}
    recorded = {r["reference_for"]: r for r in refs.get("dense", [])}
    if "evcli sparsify --nm 2:4 --model resnet50" not in recorded:
        pytest.skip("no dense reference recorded (bench/builtin_references.py --part dense)")
    ref = recorded["evcli sparsify --nm 2:4 --model resnet50"]
    assert ref["setting"] == budget_setting(recipe)  # the shipped record is of today's defaults
    rows = dense_reference_rows(report, recipe)
    assert rows and f"{ref['top1']:.2f}%" in rows[0][1]
    other = resolve_recipe("sparsify", flags={"sparsify.nm": "2:4", "model.name": "resnet50", "schedule.epochs": 3})
    assert dense_reference_rows(report, other) == []  # another budget: no quote
    assert dense_reference_rows({**report, "data": "ImageFolder /x"}, recipe) == []
