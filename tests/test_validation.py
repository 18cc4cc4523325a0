"""Validation in one place: every bad value, whether typed as a flag, given with --set or written in a YAML or
TOML recipe, gets one ``error:`` line naming the key and exit code 2, before anything trains."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from evcli.cli.common import shipped_recipes
from evcli.errors import RecipeError
from evcli.recipe import check_limit, command_sections, parse_limit, resolve_recipe
from evcli.registry import commands
from evcli.testing import TINY_ARGS, run_cli
from evcli.yamlio import DuplicateKeyError, dump_yaml, load_yaml


def assert_one_line_error(r: Any, key: str, code: int = 2) -> None:
    """Exit ``code``, stderr starting with one ``error:`` line that names ``key``, no traceback."""
    assert r.code == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error:"), r.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, r.stderr
    assert key in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# Flags and --set (mix with the tiny settings: a case that slipped through would train 3 steps, not hang)

CLI_CASES = [
    (["--img-size", "15"], "img_size"),  # test_vit's 4 px patches do not tile 15 px (timm asserted mid-step)
    (["--patch-size", "0"], "model.patch_size"),  # ZeroDivisionError in timm
    (["--img-size", "32", "--patch-size", "5"], "patch_size"),
    (["--seed", "99999999999999999999999"], "train.seed"),  # overflowed in torch.manual_seed
    (["--seed", "-1"], "train.seed"),
    (["--lr", "inf"], "optim.lr"),  # died later with "loss became nan"
    (["--lr", "nan"], "optim.lr"),
    (["--grad-accum", "0"], "train.grad_accum"),
    (["-b", "0"], "data.batch_size"),
    (["--epochs", "10000000"], "schedule.epochs"),
    (["--set", "optim.betas=[0.9]"], "optim.betas"),  # IndexError in torch.optim
    (["--set", "optim.betas=[0.9, 1.0]"], "optim.betas[1]"),
    (["--set", "optim.weight_decay=-1"], "optim.weight_decay"),
    (["--set", "optim.eps=0"], "optim.eps"),
    (["--set", "optim.lr=.nan"], "optim.lr"),
    (["--set", "optim.lr=.inf"], "optim.lr"),
    (["--set", "optim.clip_grad=0"], "optim.clip_grad"),
    (["--set", "optim.momentum=1.0"], "optim.momentum"),
    (["--set", "schedule.warmup=200%"], "schedule.warmup"),
    (["--set", "schedule.epochs=1e23"], "schedule.epochs"),
    (["--set", "schedule.gamma=0"], "schedule.gamma"),
    (["--set", "train.ema_decay=2"], "train.ema_decay"),
    (["--set", "train.log_every=-1"], "train.log_every"),
    (["--set", "data.eval_batch_size=0"], "data.eval_batch_size"),
    (["--set", "data.hflip=1.5"], "data.hflip"),
    (["--set", "model.drop_path=1"], "model.drop_path"),
    (["--set", "mix.label_smoothing=1"], "mix.label_smoothing"),
    (["--set", "mix.min_side_ratio=0.8"], "mix.min_side_ratio"),
]


@pytest.mark.parametrize(("args", "key"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_flag_or_set_is_one_line(tmp_path: Path, args: list[str], key: str):
    r = run_cli(["mix", *TINY_ARGS, *args, "-o", str(tmp_path / "run")])
    assert_one_line_error(r, key)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# Recipe files: a shipped tiny recipe with one key changed, written as YAML and as TOML

TINY_RECIPE = {"mix": "mix/tiny", "sparsify": "sparsify/tiny_lbc", "deshadow": "deshadow/tiny"}

RECIPE_CASES = [
    ("mix", "schedule.warmup", "200%"),
    ("mix", "schedule.warmup", "101%"),
    ("mix", "schedule.epochs", 1e23),  # an integer key given a float
    ("mix", "schedule.epochs", 10**7),
    ("mix", "schedule.max_steps", 0),
    ("mix", "schedule.min_lr", -1e-5),
    ("mix", "schedule.warmup_lr", -1.0),
    ("mix", "schedule.gamma", -0.1),
    ("mix", "data.eval_batch_size", 0),
    ("mix", "data.workers", -1),
    ("mix", "data.crop_pct", 0.0),
    ("mix", "data.std", [0.2, 0.0, 0.2]),
    ("mix", "data.mean", [0.5, 0.5]),
    ("mix", "train.log_every", -1),
    ("mix", "train.ema_decay", 2.0),
    ("mix", "train.ema_decay", 0.0),
    ("mix", "train.grad_accum", 0),
    ("mix", "train.seed", 2**63),
    ("mix", "optim.lr", math.inf),
    ("mix", "optim.lr", math.nan),
    ("mix", "optim.lr", 0.0),
    ("mix", "optim.clip_grad", -1.0),
    ("mix", "optim.momentum", -0.1),
    ("mix", "optim.betas", [0.9, 0.999, 0.5]),
    ("mix", "optim.eps", 0.0),
    ("mix", "optim.weight_decay", -1),
    ("mix", "mix.prob", 1.5),
    ("mix", "mix.mixup_alpha", 0.0),
    ("mix", "mix.save_mixed", -1),
    ("sparsify", "sparsify.power", 0),
    ("sparsify", "sparsify.beta", 0.0),
    ("sparsify", "sparsify.srste_decay", -1.0),
    ("sparsify", "sparsify.t_f", "150%"),
    ("deshadow", "deshadow.channels", 0),  # was silently read as "the default"
    ("deshadow", "deshadow.channels", 12),
    ("deshadow", "deshadow.mask_threshold_test", 1.0),
    ("deshadow", "deshadow.labnet_loss", [1.0, -1.0, 1.0]),
    ("deshadow", "deshadow.ring_kernel", 4),
    ("deshadow", "deshadow.rotate", 365.0),
    ("deshadow", "deshadow.kd_start", "200%"),
]


def _tiny_recipe(command: str, key: str | None = None, value: Any = None) -> dict[str, Any]:
    data = load_yaml(shipped_recipes()[TINY_RECIPE[command]].read_text())
    if key is not None:
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return data


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v) if isinstance(v, str) else str(v)


def dump_toml(data: dict[str, Any]) -> str:
    """Just enough TOML for a recipe: top-level scalars, then one table per section."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, body in data.items():
        if isinstance(body, dict):
            lines += [f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in body.items())]
    return "\n".join(lines) + "\n"


def _train_args(command: str) -> list[str]:
    return [command, "train"] if command == "deshadow" else [command]


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
@pytest.mark.parametrize(("command", "key", "value"), RECIPE_CASES, ids=[f"{k}={v}" for _, k, v in RECIPE_CASES])
def test_bad_recipe_value_is_one_line(tmp_path: Path, command: str, key: str, value: Any, fmt: str):
    data = _tiny_recipe(command, key, value)
    f = tmp_path / f"bad.{fmt}"
    f.write_text(dump_yaml(data) if fmt == "yaml" else dump_toml(data))
    r = run_cli([*_train_args(command), "--recipe", str(f), "-o", str(tmp_path / "run")])
    assert_one_line_error(r, key)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_yaml_nan_is_reported_as_nan_not_as_a_string(tmp_path: Path):
    f = tmp_path / "nan.yaml"
    f.write_text("command: mix\noptim:\n  lr: .nan\n")
    with pytest.raises(RecipeError) as info:
        resolve_recipe("mix", recipe_file=f)
    assert info.value.message.startswith("recipe key 'optim.lr' must be a finite number, got nan")


def test_limits_apply_to_optimizer_overrides():
    from evcli.engine.optim import settings_for

    r = resolve_recipe("mix", sets=["optim.overrides={D: {weight_decay: -1}}"])
    with pytest.raises(RecipeError, match=r"'optim.overrides.D.weight_decay' must be >= 0, got -1"):
        settings_for("D", r.optim, r.schedule, r.optim.overrides)


# --------------------------------------------------------------------------------------------------
# Duplicate keys, unreadable files


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("command: mix\noptim:\n  lr: 1e-3\n  lr: 2e-3\n", "duplicate key 'lr' at line 4 (first given at line 3)"),
        (
            "command: mix\noptim: {lr: 1e-3}\nschedule: {epochs: 2}\noptim: {eps: 1e-6}\n",
            "duplicate key 'optim' at line 4 (first given at line 2)",
        ),
    ],
)
def test_duplicate_yaml_key_is_an_error(tmp_path: Path, text: str, message: str):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    r = run_cli(["mix", "--recipe", str(f), *TINY_ARGS, "-o", str(tmp_path / "run")])
    assert_one_line_error(r, message)


def test_yaml_merge_keys_are_not_duplicates():
    data = load_yaml("base: &b {lr: 1, eps: 2}\noptim:\n  <<: *b\n  lr: 3\n")
    assert data["optim"] == {"lr": 3, "eps": 2}
    with pytest.raises(DuplicateKeyError):
        load_yaml("a: 1\nb: 2\na: 3\n")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("latin1.yaml", "command: mix\n# r\xe9glage\noptim: {lr: 1e-3}\n".encode("latin-1")),
        ("model.pt", b"PK\x03\x04\x00\x00\x08\x00" + bytes(range(256))),  # a torch zip checkpoint's start
        ("zeros.yaml", b"command: mix\n\x00\x00\x00"),
    ],
)
def test_unreadable_recipe_file(tmp_path: Path, name: str, content: bytes):
    f = tmp_path / name
    f.write_bytes(content)
    r = run_cli(["mix", "--recipe", str(f), *TINY_ARGS, "-o", str(tmp_path / "run")])
    assert_one_line_error(r, f"cannot read recipe {f}")
    r = run_cli(["recipe", "validate", str(f)])
    assert r.code == 2 and "cannot read recipe" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# --resume of a run folder whose resolved_recipe.yaml was damaged


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "run"
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "2", "-o", str(run)])
    assert r.code == 0, r.stderr
    return run


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (b"evcli: 1\ncommand: mix\noptim: {lr: [\n", 3, "cannot read the run's recipe"),
        (b"\xff\xfe\x00garbage\x80\x81", 3, "not UTF-8 text"),
        (b"- a\n- list\n", 3, "holds no saved recipe"),
        (b"evcli: 1\ncommand: mix\ntrain: {ema_decay: 2.0}\n", 2, "recipe key 'train.ema_decay' must be in (0, 1)"),
    ],
    ids=["bad-yaml", "binary", "not-a-mapping", "out-of-range"],
)
def test_resume_with_damaged_recipe(tmp_path: Path, finished_run: Path, content: bytes, code: int, message: str):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "resolved_recipe.yaml").write_bytes(content)
    r = run_cli(["mix", "--resume", str(run), "--max-steps", "3"])
    assert_one_line_error(r, message, code=code)
    assert "resolved_recipe.yaml" in r.stderr.splitlines()[0]


# --------------------------------------------------------------------------------------------------
# sparsify bench


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--batch", "0"], "--batch"), (["--batch", "8", "--batch", "-2"], "--batch"), (["--iters", "0"], "--iters")],
)
def test_bench_counts_must_be_positive(tmp_path: Path, args: list[str], flag: str):
    r = run_cli(["sparsify", "bench", str(tmp_path / "w.safetensors"), *args, "--cpu"])
    assert_one_line_error(r, f"{flag} must be >= 1")


# --------------------------------------------------------------------------------------------------
# Boundary values that stay valid, and the LIMITS tables themselves


@pytest.mark.parametrize(
    "item",
    [
        "schedule.warmup=100%",
        "train.ema_decay=0.9999",
        "optim.betas=[0.0, 0.999]",
        "optim.momentum=0.0",
        "optim.weight_decay=0",
        "train.seed=0",
        f"train.seed={2**63 - 1}",
        "schedule.epochs=1000000",
        "schedule.min_lr=0",
        "data.hflip=1.0",
        "optim.clip_grad=1e-3",
        "mix.prob=0",
        "mix.label_smoothing=0",
    ],
)
def test_boundary_values_are_accepted(item: str):
    key, _, _ = item.partition("=")
    r = resolve_recipe("mix", sets=[item])
    assert r.get(key) is not None


def test_boundary_values_through_the_cli(tmp_path: Path):
    f = tmp_path / "edge.yaml"
    f.write_text(dump_yaml(_tiny_recipe("mix", "schedule.warmup", "100%")))
    r = run_cli(["recipe", "validate", str(f)])
    assert r.code == 0, r.stderr
    r = run_cli(
        ["mix", *TINY_ARGS, "--img-size", "32", "--patch-size", "8", "--max-steps", "1", "-o", str(tmp_path / "r")]
        + ["--set", "train.ema=true", "--set", "train.ema_decay=0.9999", "--set", "schedule.warmup=100%"]
    )
    assert r.code == 0, r.stderr


def test_every_limits_entry_names_a_numeric_field():
    for command in commands():
        for section, cls in command_sections(command).items():
            names = {f.name for f in dataclasses.fields(cls)}
            for name, spec in getattr(cls, "LIMITS", {}).items():
                assert name in names, f"{section}.{name}"
                assert parse_limit(spec), spec
                check_limit(getattr(cls(), name), spec, f"{section}.{name}")  # the default is valid


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        (">= 0", [0, 1.5], {-1: "must be >= 0, got -1"}),
        (">= 1, <= 10", [1, 10], {0: "must be >= 1, got 0", 11: "must be <= 10, got 11"}),
        ("[0, 1)", [0, 0.5], {1.0: "must be in [0, 1), got 1", -0.1: "must be in [0, 1), got -0.1"}),
        ("(0, 1]", [1e-9, 1], {0: "must be in (0, 1], got 0", 2: "must be in (0, 1], got 2"}),
    ],
)
def test_check_limit(spec: str, good: list[float], bad: dict[float, str]):
    for v in good:
        check_limit(v, spec, "k")
        check_limit([v, v], spec, "k")
    for v, said in bad.items():
        with pytest.raises(RecipeError) as info:
            check_limit(v, spec, "k")
        assert info.value.message == f"recipe key 'k' {said}"
        with pytest.raises(RecipeError) as info:
            check_limit([good[0], v], spec, "k")
        assert info.value.message.startswith("recipe key 'k[1]' ")
