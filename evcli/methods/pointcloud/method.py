"""Engine hooks of ``evcli pointcloud``: data (built-in or standard layouts), the PointMetaBase / PointNeXt
network, the smoothed cross-entropy, confusion-matrix evaluation (voxelised rooms, full rooms by multi-pass
inference, or classification with voting), pictures of predictions."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evcli.data.loading import mix_seed
from evcli.engine.method import Method, StepOutput
from evcli.errors import DataError
from evcli.recipe import Recipe


@functools.lru_cache(maxsize=4)
def _builtin_clouds(per_class: int, seed_salt: int, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    from evcli.data.points import SHAPE_CLASSES, builtin_shape_cloud

    clouds, labels = [], []
    for c in range(len(SHAPE_CLASSES)):
        for j in range(per_class):
            clouds.append(builtin_shape_cloud(c, n_points, mix_seed(seed_salt, c, j)))
            labels.append(c)
    return np.stack(clouds), np.array(labels)


@functools.lru_cache(maxsize=4)
def _builtin_rooms(count: int, seed_salt: int, n_points: int) -> tuple[np.ndarray, ...]:
    from evcli.data.points import builtin_scene

    return tuple(builtin_scene(mix_seed(seed_salt, i), n_points) for i in range(count))


def _fps_clouds(clouds: np.ndarray, m: int) -> np.ndarray:
    """Every cloud (n, P, 3) reduced to ``m`` points by farthest point sampling (start at index 0), once."""
    from evcli.ops.points import furthest_point_sample

    if clouds.shape[1] <= m:
        return clouds
    out = np.empty((len(clouds), m, 3), np.float32)
    for i, c in enumerate(clouds):
        idx = furthest_point_sample(torch.from_numpy(np.ascontiguousarray(c[:, :3]))[None], m)[0].numpy()
        out[i] = c[idx, :3]
    return out


# seed salts of the built-in splits: training, validation (checkpoint selection) and test samples never overlap
BUILTIN_TRAIN, BUILTIN_VAL, BUILTIN_TEST = 0x7A11, 0x7E57, 0x7E5A


def build_point_data(recipe: Recipe, training: bool = True) -> Any:
    """Train and val datasets of a pointcloud recipe (built-in when ``data.path`` is null)."""
    from evcli.data.points import (
        S3DIS_CLASSES,
        SCENE_CLASSES,
        SHAPE_CLASSES,
        Augment,
        ClassificationClouds,
        ClsSettings,
        PointData,
        SegmentationRooms,
        SegSettings,
        read_h5_split,
        read_s3dis,
    )

    cfg, seed = recipe.method, recipe.train.seed
    aug = Augment(
        scale=(cfg.aug_scale[0], cfg.aug_scale[1]),
        anisotropic=cfg.aug_anisotropic,
        rotate=cfg.aug_rotate,
        jitter=(cfg.aug_jitter[0], cfg.aug_jitter[1]),
        shift=cfg.aug_shift,
        color_drop=cfg.aug_color_drop,
        auto_contrast=cfg.aug_auto_contrast,
    )
    path = recipe.data.path
    if cfg.task == "classification":
        train_s = ClsSettings(
            cfg.num_points,
            cfg.resolved_features(),
            cfg.height_index(),
            cfg.center_normalize,
            aug,
            seed,
            cfg.train_first_points,
        )
        if path is None:
            tr = _builtin_clouds(cfg.builtin_per_class, BUILTIN_TRAIN, cfg.builtin_points)
            salt = BUILTIN_TEST if cfg.builtin_split == "test" else BUILTIN_VAL
            va = _builtin_clouds(cfg.builtin_val_per_class, salt, cfg.builtin_points)
            classes = list(SHAPE_CLASSES)
            desc = (
                f"built-in synthetic shapes (trimesh primitives and compositions, {len(classes)} classes): "
                f"{len(tr[0])} train / {len(va[0])} held-out {cfg.builtin_split} clouds of "
                f"{cfg.builtin_points} surface points"
            )
        else:
            root = Path(path)
            if not root.is_dir():
                raise DataError(f"data folder not found: {root}")
            tr, va = read_h5_split(root, "train")[:2], read_h5_split(root, "test")[:2]
            n = int(max(tr[1].max(), va[1].max())) + 1
            classes = [str(i) for i in range(n)]
            desc = f"{root}: {len(tr[0])} train / {len(va[0])} test clouds (HDF5), {n} classes"
        if cfg.train_fps_points:
            tr = (_fps_clouds(tr[0], cfg.train_fps_points), tr[1])
        if cfg.eval_fps:
            va = (_fps_clouds(va[0], cfg.num_points), va[1])
        num = recipe.model.num_classes or len(classes)
        for labels, split in ((tr[1], "train"), (va[1], "test")):
            if labels.min() < 0 or labels.max() >= num:
                raise DataError(f"{path or 'built-in'}: {split} label {int(labels.max())} outside 0..{num - 1}")
        val_s = ClsSettings(cfg.num_points, train_s.features, train_s.height_axis, cfg.center_normalize, None, seed)
        return PointData(
            ClassificationClouds(tr[0], tr[1], train_s, True, "train cloud"),
            ClassificationClouds(va[0], va[1], val_s, False, "val cloud"),
            desc,
            classes,
        )
    feats = cfg.resolved_features()
    num = recipe.model.num_classes
    if path is None:
        train_rooms = list(_builtin_rooms(cfg.builtin_rooms, BUILTIN_TRAIN, cfg.builtin_room_points))
        salt = BUILTIN_TEST if cfg.builtin_split == "test" else BUILTIN_VAL
        val_rooms = list(_builtin_rooms(cfg.builtin_val_rooms, salt, cfg.builtin_room_points))
        train_names = [f"builtin_room_{i}" for i in range(len(train_rooms))]
        val_names = [f"builtin_val_room_{i}" for i in range(len(val_rooms))]
        classes = list(SCENE_CLASSES)
        desc = (
            f"built-in synthetic rooms (floor, walls, boxes, columns, balls): {len(train_rooms)} train / "
            f"{len(val_rooms)} held-out {cfg.builtin_split} rooms of {cfg.builtin_room_points} points"
        )
    else:
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
        train_rooms, train_names, val_rooms, val_names = read_s3dis(root, cfg.test_area, with_train=training)
        classes = list(S3DIS_CLASSES)
        desc = f"{root}: S3DIS, {len(train_rooms)} train rooms / {len(val_rooms)} rooms of Area_{cfg.test_area}"
    num = num or len(classes)
    s_train = SegSettings(cfg.voxel_size, cfg.voxel_max, cfg.loop, feats, cfg.height_index(True), aug, num, seed)
    s_val = SegSettings(cfg.voxel_size, cfg.voxel_max, 1, feats, cfg.height_index(False), None, num, seed)
    mode = cfg.eval_mode
    return PointData(
        SegmentationRooms(train_rooms, train_names, s_train, True)
        if train_rooms
        else SegmentationRooms(val_rooms, val_names, s_val, False),
        SegmentationRooms(val_rooms, val_names, s_val, False, mode),
        desc + ("; eval on every original point (multi-pass)" if mode == "full" else "; eval on voxelised rooms"),
        classes,
    )


def _name(names: list[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else str(label)


class PointCloudMethod(Method):
    """PointMetaBase / PointNeXt classification or segmentation (one trained module, ``model``)."""

    weights_module = "model"

    @property
    def num_classes(self) -> int:
        return self.recipe.model.num_classes or len(self._classes)

    def build_data(self, ctx: Any) -> Any:
        data = build_point_data(self.recipe, training=ctx.training)
        self._classes = data.classes
        return data

    def build(self, ctx: Any) -> dict[str, nn.Module]:
        from evcli.methods.pointcloud.model import ModelSpec, build_model

        self._classes = list(ctx.classes) or getattr(self, "_classes", [])
        if not self._classes and not self.recipe.model.num_classes:
            raise DataError("the number of classes is unknown: give model.num_classes or data with labels")
        cfg = self.cfg
        spec = ModelSpec(
            cfg.task, self.recipe.model.name, cfg.in_channels(), self.num_classes, cfg.resolved_radius(),
            cfg.resolved_scaling(), cfg.nsample,
        )  # fmt: skip
        return {"model": build_model(spec)}

    def adapt_weights(
        self, state: dict[str, torch.Tensor], module: nn.Module
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A head for another class count starts fresh (the last layer of the head); the rest must fit."""
        own = module.state_dict()
        notes = []
        for key, value in list(state.items()):
            if key.startswith("head.") and key in own and own[key].shape != value.shape:
                state[key] = own[key]
                notes.append(
                    f"{key}: {tuple(value.shape)} -> {tuple(own[key].shape)} (new head for {self.num_classes} classes)"
                )
        return state, notes

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        from evcli.methods.pointcloud.infer import smooth_cross_entropy

        logits = modules.model(batch["pos"], batch["x"])
        loss = smooth_cross_entropy(logits, batch["y"], self.cfg.label_smoothing)
        return StepOutput(loss)

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        from evcli.metrics.segmentation import confusion_matrix

        model, cfg, n = modules.model, self.cfg, self.num_classes
        if "points" in batch:  # full rooms: every original point
            from evcli.methods.pointcloud.infer import segment_points

            cm = torch.zeros(n, n, dtype=torch.float64)
            for room in batch["points"]:
                pts = room.cpu().numpy()
                pred = segment_points(model, pts, cfg).argmax(1)
                cm += confusion_matrix(pred, torch.from_numpy(pts[:, 6]).long(), n)
            return {"cm": cm.to(ctx.device)}
        if cfg.task == "classification":
            from evcli.methods.pointcloud.infer import vote_logits

            scale = (cfg.vote_scale[0], cfg.vote_scale[1])
            logits = vote_logits(
                model, batch["pos"], cfg.resolved_features(), cfg.height_index(), cfg.votes, scale, ctx.step
            )
            pred = logits.argmax(1)
        else:
            pred = model(batch["pos"], batch["x"]).argmax(1)
        return {"cm": confusion_matrix(pred, batch["y"], n)}

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        from evcli.metrics.segmentation import confusion_summary, per_class_table

        cm = sums["cm"].cpu()
        out = confusion_summary(cm)
        if self.cfg.task == "segmentation":
            out.update({f"iou_{row['class']}": row["iou"] for row in per_class_table(cm, self._class_names())})
        return out

    def tables(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, Any]:
        """The per-class table (class, count, accuracy, IoU) and the confusion matrix (rows: truth)."""
        from evcli.metrics.segmentation import per_class_table

        cm = sums["cm"].cpu()
        return {"per_class": per_class_table(cm, self._class_names()), "confusion": cm.long().tolist()}

    def _class_names(self) -> list[str]:
        return list(getattr(self, "_classes", []) or [])

    def report_extras(self, ctx: Any) -> dict[str, Any]:
        from evcli.methods.pointcloud.model import count_parameters

        model = ctx.modules.unwrap("model") if ctx.modules is not None else None
        return {
            "task": self.cfg.task,
            "architecture": self.recipe.model.name,
            "parameters_m": round(count_parameters(model) / 1e6, 4) if model is not None else None,
        }

    @torch.no_grad()
    def artifacts(self, modules: Any, out_dir: Any, ctx: Any) -> dict[str, str]:
        """Pictures of up to 4 held-out samples coloured by prediction (and the truth, for segmentation)."""
        from evcli.methods.pointcloud.infer import render_cloud

        val = ctx.engine.val_sets()
        data = next(iter(val.values()))
        folder = Path(out_dir) / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        model = modules.unwrap("model")
        model.eval()
        names, files = self._class_names(), {}
        for i in range(min(4, len(data))):
            item = data[i]
            if "points" in item:
                from evcli.methods.pointcloud.infer import segment_points

                pts = item["points"].numpy()
                xyz, truth = pts[:, :3], pts[:, 6].astype(int)
                pred = segment_points(model, pts, self.cfg).argmax(1).numpy()
            else:
                pos = item["pos"][None].to(ctx.device)
                logits = model(pos, item["x"][None].to(ctx.device))
                xyz = item["pos"].numpy()
                truth = item["y"].numpy()
                pred = logits.argmax(1)[0].cpu().numpy()
            if self.cfg.task == "classification":
                label = int(pred)
                title = f"predicted {_name(names, label)}, true {_name(names, int(truth))}"
                path = render_cloud(xyz, np.full(len(xyz), label), folder / f"val_{i}.png", title, names)
            else:
                acc = float((pred == truth).mean()) * 100
                path = render_cloud(
                    xyz, pred, folder / f"val_{i}_pred.png", f"prediction ({acc:.1f}% of points right)", names
                )
                render_cloud(xyz, truth, folder / f"val_{i}_truth.png", "ground truth", names)
            files[f"val_{i}"] = str(path)
        return files
