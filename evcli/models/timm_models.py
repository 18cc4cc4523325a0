"""Build any timm model by name, offline, with small-image ViT settings and clear errors."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from evcli.console import log, warn
from evcli.errors import UsageError


def suggest_models(name: str, n: int = 3) -> list[str]:
    """Close timm model names for a typo."""
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    if not close:
        stem = name.split("_")[0]
        close = [m for m in names if m.startswith(stem)][:n]
    return close


def auto_patch_size(img_size: int) -> int:
    """Patch size giving an 8x8 token grid for small images (evcli's choice, logged): the largest patch up to
    ``img_size // 8`` that divides the image, so that no size is refused for want of a fitting patch."""
    target = max(1, img_size // 8)
    return next(p for p in range(target, 0, -1) if img_size % p == 0)


def check_patch_grid(model: torch.nn.Module, name: str) -> None:
    """Refuse a ViT whose patches do not tile its input (timm fails at the first forward, or drops the border).

    Raises:
        UsageError: the image size is smaller than, or not a multiple of, the patch size.
    """
    embed = getattr(model, "patch_embed", None)
    img_size, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if img_size is None or patch is None or getattr(embed, "dynamic_img_pad", False):
        return
    for side, p in zip(tuple(img_size), tuple(patch) if isinstance(patch, tuple | list) else (patch, patch)):
        if side < p or side % p:
            fitting = max(p, side // p * p)
            raise UsageError(
                f"model '{name}': image size {side} is not divisible by the model's patch size {p} "
                f"(data.img_size / model.patch_size)",
                hint=f"use --img-size {fitting}, or a --patch-size that divides {side}",
            )


HUB_PREFIX = "hf-hub:"


def hub_config(name: str) -> dict[str, Any]:
    """The timm ``config.json`` of an ``hf-hub:<repo>`` model name, from the local Hugging Face cache only.

    Raises:
        CheckpointError: the config is not in the local cache (evcli never downloads).
    """
    import json

    from huggingface_hub import try_to_load_from_cache

    from evcli.errors import CheckpointError

    repo = name[len(HUB_PREFIX) :]
    found = try_to_load_from_cache(repo, "config.json")
    if not isinstance(found, str):
        raise CheckpointError(
            f"model '{name}': its config.json is not in the local Hugging Face cache; evcli never downloads",
            hint=f"where there is network, python -c \"import timm; timm.create_model('{name}', pretrained=True)\" "
            "fills the cache",
        )
    return json.loads(Path(found).read_text(encoding="utf-8"))


def create_model(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_rate: float = 0.0,
    drop_path: float = 0.0,
    kwargs: dict[str, Any] | None = None,
    warn_tag: bool = True,
) -> torch.nn.Module:
    """Create a timm model with random weights (never downloads; ``warn_tag``: say so for a tagged name).

    ``img_size`` is passed to models that take it (ViTs); ``patch_size`` defaults to the model's own,
    except below 64 px where an 8x8 grid is chosen (logged).

    Raises:
        UsageError: unknown model name (with close names), arguments the model does not take, or an image size
            its patches do not tile.
    """
    import timm

    if name.startswith(HUB_PREFIX):  # the architecture and its arguments from the cached config.json
        config = hub_config(name)
        kwargs = {**config.get("model_args", {}), **(kwargs or {})}
        for key in ("img_size", "patch_size", "num_classes", "drop_rate", "drop_path_rate"):
            kwargs.pop(key, None)  # the run's own
        name = config["architecture"]
        warn_tag = False
    if not timm.is_model(name):
        close = suggest_models(name)
        raise UsageError(
            f"unknown timm model '{name}'" + (f" (did you mean: {', '.join(close)}?)" if close else ""),
            hint="list names with: python -c \"import timm; print(timm.list_models('*vit*'))\"",
        )
    if patch_size is not None and patch_size < 1:
        raise UsageError(f"model.patch_size must be >= 1, got {patch_size}")
    arch, _, tag = name.partition(".")
    if tag and warn_tag:
        # a tag names pretrained weights; evcli never downloads: say so instead of a silent random init
        warn(
            f"model '{name}': the tag '{tag}' names pretrained weights, which evcli does not download; this model "
            f"starts from random weights (give them with --weights FILE.safetensors, e.g. from the Hugging Face "
            f"cache)"
        )
    extra: dict[str, Any] = dict(kwargs or {})
    if drop_path:
        extra["drop_path_rate"] = drop_path
    sized: dict[str, Any] = {}
    if img_size is not None:
        sized["img_size"] = img_size
        if patch_size is None and img_size < 64:
            sized["patch_size"] = auto_patch_size(img_size)
    if patch_size is not None:
        sized["patch_size"] = patch_size

    def build(**size_args: Any) -> torch.nn.Module:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **extra, **size_args
        )

    try:
        while True:
            try:
                model = build(**sized)
                break
            except TypeError as exc:
                # CNNs (and PVT) take no img_size; only ViT-style models take patch_size.
                dropped = next((k for k in ("img_size", "patch_size") if k in sized and k in str(exc)), None)
                if dropped is None:
                    raise
                if dropped == "patch_size" and patch_size is not None:
                    raise UsageError(f"model '{name}' has no patch size (patch_size is for ViT-style models)") from exc
                sized.pop(dropped)
    except TypeError as exc:
        raise UsageError(f"model '{name}' rejected its arguments: {exc}") from exc
    except (AssertionError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in msg or "out of memory" in msg:
            from evcli.errors import HardwareError

            raise HardwareError(
                f"out of memory building model '{name}' with {dict(extra, **sized)}", hint="use a smaller model"
            ) from exc
        raise UsageError(f"cannot build model '{name}' with {dict(extra, **sized)}: {msg}") from exc
    check_patch_grid(model, name)
    if "patch_size" in sized and patch_size is None:
        log(f"model: patch_size {sized['patch_size']} for {img_size} px images (set model.patch_size to change)")
    return model


def cached_pretrained(name: str) -> Path:
    """The local Hugging Face cache's ``model.safetensors`` of timm model ``name`` (a tag picks the weights, else
    timm's default tag). Nothing is downloaded.

    Raises:
        UsageError: the model has no pretrained weights in timm.
        CheckpointError: the weights are not in the local cache.
    """
    import timm
    from huggingface_hub import try_to_load_from_cache

    from evcli.errors import CheckpointError

    if name.startswith(HUB_PREFIX):
        hub_id = name[len(HUB_PREFIX) :]
    else:
        cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
        hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise UsageError(f"timm has no pretrained weights for '{name}' on the Hugging Face hub")
    found = try_to_load_from_cache(hub_id, "model.safetensors")
    if not isinstance(found, str):
        raise CheckpointError(
            f"the pretrained weights of '{name}' ({hub_id}) are not in the local Hugging Face cache; evcli never "
            "downloads",
            hint=f"where there is network, python -c \"import timm; timm.create_model('{name}', pretrained=True)\" "
            "fills the cache; or give the weights with --weights FILE.safetensors",
        )
    return Path(found)


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """Normalisation mean/std and interpolation of a timm model's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    }
