"""Recipes: YAML scalars, schema validation, precedence, durations, shipped recipes, bad-recipe corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from evcli.cli.common import shipped_recipes
from evcli.durations import parse_duration, resolve_duration
from evcli.errors import RecipeError
from evcli.recipe import Recipe, recipe_from_saved, resolve_recipe
from evcli.yamlio import dump_yaml, load_yaml


def test_yaml_scalars_are_what_a_person_means():
    data = load_yaml("lr: 1e-4\nnm: 2:4\nflag: no\nyes_: true\nn: 12\nx: 1.5e+3\nneg: -3\ns: '7'")
    assert data == {"lr": 1e-4, "nm": "2:4", "flag": "no", "yes_": True, "n": 12, "x": 1500.0, "neg": -3, "s": "7"}
    assert isinstance(data["lr"], float) and isinstance(data["n"], int)


def test_yaml_round_trip_keeps_types():
    data = {"a": "1e-4", "b": "2:4", "c": "no", "d": 1e-6, "e": "5ep", "f": [0.5, 1.0], "g": None}
    assert load_yaml(dump_yaml(data)) == data


def test_precedence_defaults_file_flags_set(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("command: mix\noptim: {lr: 1e-3, weight_decay: 0.1}\nschedule: {epochs: 7}\nmix: {method: mixup}\n")
    r = resolve_recipe("mix", recipe_file=f, flags={"schedule.epochs": 3, "optim.lr": 2e-3}, sets=["optim.lr=4e-3"])
    assert r.optim.weight_decay == 0.1  # file over defaults
    assert r.schedule.epochs == 3  # flag over file
    assert r.optim.lr == 4e-3  # --set over flag
    assert r.method.method == "mixup"
    assert r.optim.eps == 1e-8  # schema default
    assert r.provenance["optim.lr"] == "--set" and r.provenance["schedule.epochs"] == "flags"


def test_toml_recipe(tmp_path: Path):
    f = tmp_path / "r.toml"
    f.write_text('command = "mix"\n[optim]\nlr = 1e-4\n[mix]\nmethod = "none"\n')
    r = resolve_recipe("mix", recipe_file=f)
    assert r.optim.lr == 1e-4 and r.method.method == "none"


def test_resolved_recipe_round_trips():
    r = resolve_recipe("mix", sets=["schedule.warmup=10%", "model.kwargs={depth: 2}"])
    again = recipe_from_saved(load_yaml(r.to_yaml()))
    assert again == r
    assert isinstance(again, Recipe)


@pytest.mark.parametrize(("text", "steps"), [("10%", 50), ("2ep", 20), ("2.5ep", 25), ("30step", 30), ("0step", 0)])
def test_durations(text: str, steps: int):
    assert resolve_duration(text, steps_per_epoch=10, total_steps=500) == steps


@pytest.mark.parametrize("bad", ["10", "ep", "5 days", "-1ep", "%"])
def test_bad_durations(bad: str):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_img_size_default_depends_on_data():
    assert resolve_recipe("mix").data.img_size == 32
    assert resolve_recipe("mix", flags={"data.path": "/x"}).data.img_size == 224


BAD_RECIPES = [
    ("command: mix\noptim: {lrr: 1e-3}\n", "unknown recipe key 'optim.lrr'", "did you mean 'optim.lr'"),
    ("command: mix\noptim: {lr: fast}\n", "expected a number, got the string 'fast'", None),
    ("command: mix\noptim: {lr: '1e-3'}\n", "expected a number, got the string '1e-3'", None),
    ("command: mix\ndata: {batch_size: 8.5}\n", "expected an integer", None),
    ("command: mix\ntrain: {ema: yes}\n", "expected true or false", None),
    ("command: mix\nmix: {method: cutmx}\n", "expected one of", "did you mean 'cutmix'"),
    ("command: mix\nmodle: {name: x}\n", "unknown recipe section 'modle'", "did you mean 'model'"),
    ("command: mix\nschedule: {warmup: 5}\n", "expected a duration", None),
    ("command: mix\nschedule: {epochs: 0}\n", "must be >= 1", None),
    ("command: mix\ndata: {batch_size: 7}\n", "even batch size", None),
    ("command: sparsify\n", "not 'evcli mix'", None),
    ("evcli: 2\ncommand: mix\n", "schema version", None),
    ("command: mix\noptim: [1, 2]\n", "expected a mapping", None),
    ("command: mix\noptim: {lr: 1e-3\n", "cannot parse recipe", None),
    ("- just\n- a list\n", "must be a mapping", None),
]


@pytest.mark.parametrize(("text", "message", "hint"), BAD_RECIPES)
def test_bad_recipe_corpus(tmp_path: Path, text: str, message: str, hint: str | None):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError) as info:
        resolve_recipe("mix", recipe_file=f)
    assert message in info.value.message
    if hint:
        assert hint in info.value.message


@pytest.mark.parametrize("item", ["optim.lrr=1", "optim.lr=abc", "nodot=1", "optim"])
def test_bad_set(item: str):
    with pytest.raises(RecipeError):
        resolve_recipe("mix", sets=[item])


def test_every_shipped_recipe_loads():
    table = shipped_recipes()
    assert table, "no shipped recipes found"
    for name, path in table.items():
        command = load_yaml(path.read_text())["command"]
        r = resolve_recipe(command, recipe_file=path)
        assert r.command == command, name
        assert path.read_text().startswith("#"), f"{name}: first line must describe the recipe"


def test_recipes_symlink_points_at_package_recipes():
    root = Path(__file__).resolve().parents[1]
    assert (root / "recipes").resolve() == (root / "evcli" / "recipes").resolve()


def test_builtin_data_defaults_apply_only_to_the_builtin_data(tmp_path, monkeypatch):
    from evcli.registry import get_command

    spec = get_command("mix")
    monkeypatch.setattr(spec, "builtin_defaults", {"schedule.epochs": 7, "data.hflip": 0.0})
    r = resolve_recipe("mix")
    assert r.schedule.epochs == 7 and r.data.hflip == 0.0
    assert r.provenance["schedule.epochs"] == "built-in data defaults"
    assert resolve_recipe("mix", flags={"schedule.epochs": 3}).schedule.epochs == 3  # a flag still wins
    folder = resolve_recipe("mix", flags={"data.path": str(tmp_path)})
    assert folder.schedule.epochs == 10 and folder.data.hflip == 0.5  # the user's data: command defaults only
