"""Recipes: typed, validated run settings built from defaults, a file, typed flags and ``--set``.

One precedence rule, logged with every run::

    schema defaults  <  command defaults  <  recipe file  <  flags the user typed  <  --set a.b=c

A recipe is YAML (or TOML, by file extension) with one section per concern (``model``, ``data``,
``optim``, ``schedule``, ``train``, ``out``) plus one section named after the subcommand holding the
method's own keys (``mix:``, ``sparsify:``...). Unknown keys are errors with a did-you-mean, values are
type-checked (a string is never silently taken for a number), and phase lengths take relative units
(``"10%"``, ``"5ep"``, ``"200step"``) so that ``--epochs`` rescales the whole schedule.

Validation happens here, in one place, whichever layer a value came from: every float must be finite, every
integer must fit in 64 bits, a duration in percent must be at most 100%, and each schema dataclass lists the
range of its keys in a ``LIMITS`` table (``{"weight_decay": ">= 0", "ema_decay": "(0, 1)"}``, a list key's
items each) that :func:`build_section` enforces. Checks across keys live in :func:`validate_recipe` and in
each method config's ``validate``.

This module must stay free of torch imports: ``evcli --help`` and shell completion load it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomllib

from evcli.durations import Duration, parse_duration
from evcli.errors import RecipeError
from evcli.yamlio import dump_yaml, load_yaml, parse_scalar

SCHEMA_VERSION = 1
BUILTIN_IMG_SIZE = 32  # default input size on the built-in data (its images are 8x8)

# Sanity ceilings: integers end up in int64 tensors (step counters, seeds), and a run of more epochs or steps
# than these is a typo, not a plan.
MAX_INT = 2**63 - 1
MAX_EPOCHS = 10**6
MAX_STEPS = 10**12
MAX_BATCH = 2**20
MAX_IMG_SIZE = 2**16


# --------------------------------------------------------------------------------------------------
# The common sections. Field comments become the documentation of `evcli recipe show --schema`.


@dataclass
class ModelConfig:
    """Which network to build and what to load into it."""

    name: str = "deit_tiny_patch16_224"  # timm model name (random init; see `weights`)
    patch_size: int | None = None  # ViT patch size passed to timm (small images need small patches)
    num_classes: int | None = None  # default: the number of classes of the data
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path: float = 0.0  # stochastic depth rate
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for timm.create_model
    pretrained: bool = False  # timm's pretrained weights of `name` from the local Hugging Face cache (never downloads)
    weights: str | None = None  # local .safetensors file with pretrained weights
    weights_strict: bool = True  # false: load matching keys only and list the rest
    init_from: str | None = None  # run folder or checkpoint whose weights start this run

    LIMITS: ClassVar[dict[str, str]] = {
        "patch_size": f">= 1, <= {MAX_IMG_SIZE}",
        "num_classes": ">= 1",
        "drop_rate": "[0, 1)",
        "drop_path": "[0, 1)",
    }


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    path: str | None = None  # ImageFolder root with train/ and val/ (or MNIST-style IDX files); null = built-in
    builtin: Literal["digits"] = "digits"  # built-in real images used when `path` is null
    img_size: int | None = None  # default: 224 for an ImageFolder, 32 for the built-in data
    batch_size: int = 64  # per process
    eval_batch_size: int | None = None  # default: 2 x batch_size
    workers: int = 2
    skip_corrupt: bool = False  # true: skip unreadable images with a warning instead of failing
    # train on a class-balanced subset of this many training images (the first of each class in file order);
    # null = all. For quick runs and benches on large sets; val is never subsampled
    train_subset: int | None = None
    val_subset: int | None = None  # the same for the val set (quicker evaluations; says so in the run's data line)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5
    auto_augment: str | None = None  # timm policy, e.g. rand-m9-mstd0.5-inc1
    color_jitter: float = 0.0
    re_prob: float = 0.0  # random erasing probability
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    crop_pct: float = 0.875  # eval centre-crop fraction
    mean: list[float] | None = None  # default: the model's pretrained-config normalisation
    std: list[float] | None = None

    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": f">= 1, <= {MAX_IMG_SIZE}",
        "batch_size": f">= 1, <= {MAX_BATCH}",
        "eval_batch_size": f">= 1, <= {MAX_BATCH}",
        "workers": ">= 0, <= 1024",
        "train_subset": ">= 1",
        "val_subset": ">= 1",
        "scale": "(0, 1]",
        "hflip": "[0, 1]",
        "color_jitter": ">= 0",
        "re_prob": "[0, 1]",
        "crop_pct": "(0, 1]",
        "std": "> 0",
    }


@dataclass
class OptimConfig:
    """Optimizer of the model weights."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float | None = 5e-4  # the learning rate, as given (absolute, whatever the batch)
    # or: the learning rate at lr_base_batch images per optimizer step, scaled to the run's global batch (timm's
    # --lr-base); set one of lr and lr_base: of the two, the one given by the more specific layer wins
    lr_base: float | None = None
    lr_base_batch: int | None = None  # the batch lr_base is given for (default 256)
    weight_decay: float = 0.05  # not applied to biases and norm weights
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    eps: float = 1e-8
    clip_grad: float | None = None  # max global grad norm
    # settings of one named optimizer of the method (e.g. {D: {lr: 2e-4}, G: {sched: linear}}): any key of
    # `optim` or `schedule`, over this section and `schedule`; a name the method does not define is an error
    overrides: dict = field(default_factory=dict)

    LIMITS: ClassVar[dict[str, str]] = {
        "lr": "> 0",
        "lr_base": "> 0",
        "lr_base_batch": f">= 1, <= {MAX_BATCH}",
        "weight_decay": ">= 0",
        "momentum": "[0, 1)",
        "betas": "[0, 1)",
        "eps": "> 0",
        "clip_grad": "> 0",
    }


@dataclass
class ScheduleConfig:
    """Length of training and the learning-rate schedule."""

    epochs: int = 300
    max_steps: int | None = None  # cap on optimizer steps (smoke runs); relative units follow it
    sched: Literal["cosine", "step", "constant", "linear"] = "cosine"  # linear: constant, then linearly to 0
    warmup: Duration = Duration("0step")  # linear warm-up from warmup_lr
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5  # cosine floor
    milestones: list[Duration] = field(default_factory=list)  # step schedule: lr *= gamma at each
    gamma: float = 0.1
    decay_start: Duration = Duration("0step")  # linear schedule: lr constant until here, then linearly to 0

    LIMITS: ClassVar[dict[str, str]] = {
        "epochs": f">= 1, <= {MAX_EPOCHS}",
        "max_steps": f">= 1, <= {MAX_STEPS}",
        "warmup_lr": ">= 0",
        "min_lr": ">= 0",
        "gamma": "> 0",
    }


@dataclass
class TrainConfig:
    """The engine: processes, precision, accumulation, EMA, cadence, seeds."""

    seed: int = 0
    grad_accum: int = 1
    # null: what `accelerate launch --mixed_precision` / `accelerate config` set, else no
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    ema: bool = False  # keep an exponential moving average of the weights (evaluated and exported)
    ema_decay: float = 0.9998
    eval_every: Duration = Duration("1ep")
    ckpt_every: Duration | None = None  # default: same as eval_every
    log_every: int = 10  # steps between metric log lines
    best_metric: str = "top1"  # metric (from the method's evaluate) that selects best.safetensors
    best_mode: Literal["max", "min"] = "max"  # whether higher or lower best_metric is better
    cpu: bool = False  # force CPU even when CUDA is available
    log_with: list[str] = field(default_factory=list)  # Accelerate trackers: tensorboard, wandb, mlflow, ...
    # torch CPU threads per process (null: torch's default, one per core); 1 is often much faster on a CPU that
    # other jobs share (no oversubscription)
    threads: int | None = None

    LIMITS: ClassVar[dict[str, str]] = {
        "seed": f">= 0, <= {MAX_INT}",
        "threads": ">= 1, <= 1024",
        "grad_accum": f">= 1, <= {MAX_BATCH}",
        "ema_decay": "(0, 1)",
        "log_every": ">= 1",
    }


@dataclass
class OutConfig:
    """Where the run folder goes."""

    dir: str | None = None  # the run folder; default runs/<command>/<time>-<model>-<method>


COMMON_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "out": OutConfig,
}

# Keys that change what a resumed run computes; `--resume` refuses to change them without --force.
RESUME_LOCKED_PREFIXES = (
    "model.",
    "optim.",
    "schedule.",
    "data.batch_size",
    "data.path",
    "data.builtin",
    "data.img_size",
    "train.seed",
    "train.grad_accum",
    "train.mixed_precision",
    "train.ema",
)


@dataclass
class Recipe:
    """A fully resolved recipe: common sections plus the method section of one subcommand."""

    command: str
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    train: TrainConfig
    out: OutConfig
    method: Any  # the dataclass registered for `command`
    evcli: int = SCHEMA_VERSION
    provenance: dict[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data, with the method section under the command's name."""
        data: dict[str, Any] = {"evcli": self.evcli, "command": self.command}
        for name in COMMON_SECTIONS:
            data[name] = dataclasses.asdict(getattr(self, name))
        data[self.command] = dataclasses.asdict(self.method)
        return data

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def get(self, dotted: str) -> Any:
        """Value at a dotted key, e.g. ``optim.lr`` or ``mix.method``."""
        node: Any = self.to_dict()
        for part in dotted.split("."):
            node = node[part]
        return node


# --------------------------------------------------------------------------------------------------
# Type checking and coercion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Duration:
        return "a duration like '10%', '5ep' or '200step'"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + " (or null)"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def did_you_mean(word: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _show(value: Any) -> str:
    """A value as a user typed it: ``-1`` for -1.0, ``'200%'`` for a duration."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    if isinstance(value, str):
        return repr(str(value))
    return str(value)


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_CONDITION_RE = re.compile(rf"^(>=|>|<=|<)\s*({_NUMBER})$")
_INTERVAL_RE = re.compile(rf"^([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])$")


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def parse_limit(spec: str) -> list[tuple[str, int | float]]:
    """The conditions of a ``LIMITS`` entry: ``">= 1, <= 100"`` or an interval ``"[0, 1)"``.

    Raises:
        ValueError: a malformed entry (a schema bug, not user input).
    """
    text = spec.strip()
    m = _INTERVAL_RE.match(text)
    if m:
        return [(">=" if m[1] == "[" else ">", _number(m[2])), ("<=" if m[4] == "]" else "<", _number(m[3]))]
    conditions = []
    for part in text.split(","):
        c = _CONDITION_RE.match(part.strip())
        if not c:
            raise ValueError(f"bad limit {spec!r}: use e.g. '>= 0', '>= 1, <= 100' or '[0, 1)'")
        conditions.append((c[1], _number(c[2])))
    return conditions


_COMPARE = {
    ">=": lambda v, b: v >= b,
    ">": lambda v, b: v > b,
    "<=": lambda v, b: v <= b,
    "<": lambda v, b: v < b,
}


def check_limit(value: Any, spec: str, key: str) -> None:
    """Refuse a value outside its ``LIMITS`` entry: a number, a duration's amount, or each item of a list.

    Raises:
        RecipeError: ``recipe key 'optim.weight_decay' must be >= 0, got -1``.
    """
    if value is None:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_limit(item, spec, f"{key}[{i}]")
        return
    amount = parse_duration(value)[0] if isinstance(value, Duration) else value
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"LIMITS entry for non-numeric key {key}")  # schema bug, not user input
    for op, bound in parse_limit(spec):
        if not _COMPARE[op](amount, bound):
            wanted = f"in {spec.strip()}" if spec.strip()[0] in "[(" else f"{op} {bound}"
            raise RecipeError(f"recipe key '{key}' must be {wanted}, got {_show(value)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as exc:
                errors.append(exc)
        if len(errors) == 1:  # one type besides null: its own, more precise message
            raise errors[0]
        raise RecipeError(f"recipe key '{key}': expected {_type_name(tp)}, got {_describe(value)}")
    if value is None:
        raise RecipeError(f"recipe key '{key}': expected {_type_name(tp)}, got null")
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise RecipeError(f"recipe key '{key}': expected {_type_name(tp)}, got {_describe(value)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"recipe key '{key}': expected {_type_name(tp)}, got {_describe(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}': expected a mapping, got {_describe(value)}")
        return dict(value)
    if tp is Duration:
        if isinstance(value, str):
            try:
                amount, unit = parse_duration(value)
            except ValueError:
                pass
            else:
                cap = {"%": 100, "ep": MAX_EPOCHS, "step": MAX_STEPS}[unit]
                if amount > cap:
                    raise RecipeError(f"recipe key '{key}' must be at most {cap}{unit}, got {value.strip()!r}")
                return Duration(value.strip())
        raise RecipeError(f"recipe key '{key}': expected {_type_name(tp)}, got {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -MAX_INT - 1 <= value <= MAX_INT:
                raise RecipeError(f"recipe key '{key}' is out of range (a 64-bit integer), got {value}")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if isinstance(value, float) or abs(value) <= MAX_INT else math.inf
            if not math.isfinite(number):
                raise RecipeError(f"recipe key '{key}' must be a finite number, got {_show(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema bug, not user input
        raise TypeError(f"unsupported schema type {tp!r} at {key}")
    raise RecipeError(f"recipe key '{key}': expected {_type_name(tp)}, got {_describe(value)}")


def section_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a schema dataclass."""
    hints = typing.get_type_hints(cls, include_extras=False)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Validate a mapping against a schema dataclass and build it (missing keys take defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe key '{prefix}': expected a mapping, got {_describe(raw)}")
    fields_ = section_fields(cls)
    for k in raw:
        if k not in fields_:
            raise RecipeError(
                f"unknown recipe key '{prefix}.{k}'{did_you_mean(str(k), fields_, prefix + '.')}",
                hint=f"valid keys in '{prefix}': {', '.join(fields_)}",
            )
    kwargs = {k: _coerce(v, fields_[k], f"{prefix}.{k}") for k, v in raw.items()}
    section = cls(**kwargs)
    for name, spec in getattr(cls, "LIMITS", {}).items():
        check_limit(getattr(section, name), spec, f"{prefix}.{name}")
    return section


# --------------------------------------------------------------------------------------------------
# Layers and merging


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def parse_set(items: typing.Iterable[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "sparsify.nm=2:4"]`` -> ``{"optim.lr": 1e-4, "sparsify.nm": "2:4"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or "." not in key:
            raise RecipeError(
                f"--set expects section.key=value, got {item!r}",
                hint="e.g. --set optim.lr=1e-4 --set schedule.epochs=30",
            )
        out[key] = parse_scalar(value.strip())
    return out


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML recipe file into plain data (no validation yet)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        raw = p.read_bytes()
        if b"\0" in raw:
            raise ValueError("a binary file, not YAML or TOML text")
        text = raw.decode("utf-8")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise RecipeError(
            f"cannot read recipe {p}: {reason}", hint="a recipe is a .yaml or .toml text file (UTF-8)"
        ) from exc
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else load_yaml(text)
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"cannot parse recipe {p}: {first}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p} must be a mapping of sections, got {_describe(data)}")
    return data


def command_sections(command: str) -> dict[str, type]:
    """Section name -> schema of a command's recipe: the common sections (a command may replace one with its
    own typed section, e.g. point clouds' ``data`` without ``img_size``) plus its method section."""
    from evcli.registry import get_command

    spec = get_command(command)
    return {**COMMON_SECTIONS, **spec.sections, command: spec.config}


def _check_keys(layer: dict[str, Any], sections: dict[str, type], source: str) -> None:
    """Reject unknown sections/keys of one layer, naming where they came from."""
    for dotted in _flatten(layer):
        parts = dotted.split(".")
        if parts[0] in ("evcli", "command") and len(parts) == 1:
            continue
        if parts[0] not in sections:
            raise RecipeError(
                f"unknown recipe section '{parts[0]}' in {source}"
                f"{did_you_mean(parts[0], list(sections) + ['evcli', 'command'])}",
                hint=f"sections: {', '.join(sections)}",
            )
        if len(parts) == 1:
            continue
        fields_ = section_fields(sections[parts[0]])
        if parts[1] not in fields_:
            raise RecipeError(
                f"unknown recipe key '{parts[0]}.{parts[1]}' in {source}"
                f"{did_you_mean(parts[1], fields_, parts[0] + '.')}",
                hint=f"valid keys in '{parts[0]}': {', '.join(fields_)}",
            )


def _data_path(layers: list[tuple[str, dict[str, Any]]]) -> Any:
    """``data.path`` as the last layer that sets it leaves it (None: the built-in data)."""
    path = None
    for _, layer in layers:
        data = layer.get("data")
        if isinstance(data, dict) and "path" in data:
            path = data["path"]
    return path


def resolve_recipe(
    command: str,
    recipe_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: typing.Iterable[str] = (),
    base: dict[str, Any] | None = None,
) -> Recipe:
    """Build the resolved recipe of ``command`` from its layers.

    Args:
        command: subcommand name (``mix``, ``sparsify``...), selecting the method section.
        recipe_file: YAML/TOML file, or None.
        flags: dotted key -> value for the flags the user typed (None values are ignored).
        sets: ``--set`` items ``a.b=c``.
        base: a saved resolved recipe (``--resume``) used instead of defaults + file.

    Raises:
        RecipeError: unknown key, wrong type, wrong schema version or command.
    """
    from evcli.registry import get_command

    spec = get_command(command)
    sections_map = command_sections(command)
    provenance: dict[str, str] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if base is not None:
        layers.append(("resumed run", base))
    else:
        layers.append(("command defaults", unflatten(spec.defaults)))
        if recipe_file is not None:
            layers.append((str(recipe_file), read_recipe_file(recipe_file)))
    if flags:
        layers.append(("flags", unflatten({k: v for k, v in flags.items() if v is not None})))
    set_values = parse_set(sets)
    if set_values:
        layers.append(("--set", unflatten(set_values)))
    if base is None and spec.builtin_defaults and _data_path(layers) is None:
        # the built-in data: settings that let the default model learn on it, under any file or flag
        layers.insert(1, ("built-in data defaults", unflatten(spec.builtin_defaults)))

    merged: dict[str, Any] = {}
    given: dict[str, int] = {}  # optim.lr / optim.lr_base -> the last layer that set it
    for index, (source, layer) in enumerate(layers):
        _check_keys(layer, sections_map, source)
        for k, v in _flatten(layer).items():
            provenance[k] = source
            if k in ("optim.lr", "optim.lr_base") and v is not None:
                given[k] = index
        merged = _deep_merge(merged, layer)
    _one_learning_rate(merged, given, layers)

    version = merged.pop("evcli", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RecipeError(f"recipe schema version {version!r} is not supported (this evcli reads {SCHEMA_VERSION})")
    rec_command = merged.pop("command", command)
    if rec_command != command:
        raise RecipeError(f"this recipe is for 'evcli {rec_command}', not 'evcli {command}'")
    try:
        sections = {name: build_section(sections_map[name], merged.get(name), name) for name in COMMON_SECTIONS}
        method = build_section(spec.config, merged.get(command), command)
        recipe = Recipe(command=command, method=method, provenance=provenance, **sections)
        if getattr(recipe.data, "img_size", 0) is None:
            recipe.data.img_size = BUILTIN_IMG_SIZE if recipe.data.path is None else 224
        if getattr(recipe.data, "path", None) and not Path(recipe.data.path).expanduser().is_absolute():
            # stored absolute: eval and resume from another directory read the same data
            recipe.data.path = str(Path(recipe.data.path).expanduser().absolute())
        validate_recipe(recipe)
    except RecipeError as exc:
        key = exc.message.split("'")[1].split("[")[0] if "'" in exc.message else ""
        source = provenance.get(key)
        if source and source != "command defaults":
            exc.message += f" [from {source}]"
            exc.args = (exc.message,)
        raise
    return recipe


def _one_learning_rate(merged: dict[str, Any], given: dict[str, int], layers: list) -> None:
    """Keep one of ``optim.lr`` (absolute) and ``optim.lr_base`` (scaled to the global batch): the one given by
    the more specific layer (``--lr`` over a recipe's ``lr_base``, a recipe's ``lr_base`` over a command's
    default ``lr``); both in one layer is an error."""
    optim = merged.get("optim")
    if not isinstance(optim, dict) or optim.get("lr_base") is None:
        return
    lr_at, base_at = given.get("optim.lr", -1), given.get("optim.lr_base", -1)
    if lr_at == base_at:
        raise RecipeError(
            f"optim.lr and optim.lr_base are both set in {layers[lr_at][0]}: set one",
            hint="lr is the learning rate as given; lr_base is scaled by global batch / lr_base_batch",
        )
    optim["lr" if base_at > lr_at else "lr_base"] = None


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """The learning rate of a run: ``lr`` as given, or ``lr_base`` x global batch / ``lr_base_batch`` (256)."""
    if optim.lr is not None:
        return optim.lr
    return optim.lr_base * global_batch / (optim.lr_base_batch or 256)


def validate_recipe(recipe: Recipe) -> None:
    """Checks across keys that types and the per-key ``LIMITS`` alone cannot express."""
    if recipe.optim.lr is None and recipe.optim.lr_base is None:
        raise RecipeError("recipe key 'optim.lr' is not set (nor optim.lr_base): give a learning rate")
    scale = getattr(recipe.data, "scale", [0.5, 1.0])
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise RecipeError(f"recipe key 'data.scale' must be [min, max] with 0 < min <= max <= 1, got {scale}")
    for key in ("mean", "std"):
        stats = getattr(recipe.data, key, None)
        if stats is not None and len(stats) not in (1, 3):
            raise RecipeError(f"recipe key 'data.{key}' must be one number per channel ([r, g, b]), got {stats}")
    if len(recipe.optim.betas) != 2:
        raise RecipeError(f"recipe key 'optim.betas' must be two numbers [beta1, beta2], got {recipe.optim.betas}")
    check = getattr(recipe.method, "validate", None)
    if check is not None:
        check(recipe)


def locked_changes(saved: Recipe, new: Recipe) -> list[str]:
    """Keys whose change would alter a resumed run's computation."""
    a, b = _flatten(saved.to_dict()), _flatten(new.to_dict())
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    method_prefix = f"{saved.command}."
    return [k for k in changed if k.startswith(RESUME_LOCKED_PREFIXES) or k.startswith(method_prefix)]


def recipe_from_saved(data: dict[str, Any]) -> Recipe:
    """Rebuild a Recipe from its saved plain form (a run folder or checkpoint metadata)."""
    command = data.get("command")
    if not isinstance(command, str):
        raise RecipeError("saved recipe has no 'command'")
    return resolve_recipe(command, base=data)


def explain_provenance(recipe: Recipe) -> str:
    """One line saying which keys came from flags and --set (the precedence log)."""
    by_source: dict[str, list[str]] = {}
    for key, source in recipe.provenance.items():
        if source in ("command defaults",):
            continue
        by_source.setdefault(source, []).append(key)
    if not by_source:
        return "recipe: defaults only"
    parts = [
        f"{src}: {len(keys)} key(s)" if len(keys) > 6 else f"{src}: {', '.join(keys)}"
        for src, keys in by_source.items()
    ]
    order = "defaults < built-in data defaults < file" if "built-in data defaults" in by_source else "defaults < file"
    return f"recipe ({order} < flags < --set): " + "; ".join(parts)
