"""Recipe schema of ``evcli pointcloud`` (the ``pointcloud:`` section and its own ``data:`` section without
``img_size``). Torch-free: loaded by --help and recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from evcli.errors import RecipeError
from evcli.registry import register_command

SEG_MODELS = (
    "pointmetabase-s", "pointmetabase-l", "pointmetabase-xl", "pointmetabase-xxl", "pointmetabase-xxxl",
    "pointnext-s", "pointnext-b", "pointnext-l", "pointnext-xl",
)  # fmt: skip
CLS_MODELS = ("pointmetabase-s", "pointnext-s")


@dataclass
class PointDataConfig:
    """Where the point clouds come from (no image size: the samples are clouds)."""

    path: str | None = None  # ModelNet40/ScanObjectNN .h5 folder or S3DIS root (raw/Area_*.npy); null = built-in
    batch_size: int = 32  # per process
    eval_batch_size: int | None = None  # default: 2 x batch_size (segmentation full rooms: 1)
    workers: int = 0

    LIMITS: ClassVar[dict[str, str]] = {
        "batch_size": ">= 1, <= 1048576",
        "eval_batch_size": ">= 1, <= 1048576",
        "workers": ">= 0, <= 1024",
    }


@register_command(
    "pointcloud",
    implementation="evcli.methods.pointcloud.method:PointCloudMethod",
    help="PointMetaBase (and the PointNeXt baseline) for point-cloud classification and segmentation.",
    defaults={
        "model.name": "pointmetabase-s",
        "optim.name": "adamw",
        "optim.lr": 1e-3,
        "optim.weight_decay": 0.05,
        "optim.clip_grad": 1.0,
        "schedule.epochs": 600,
        "schedule.sched": "cosine",
        "schedule.min_lr": 1e-5,
        "train.best_metric": "auto",
    },
    sections={"data": PointDataConfig},
)
@dataclass
class PointCloudConfig:
    """Task, inputs, augmentations, loss and evaluation protocol of a point-cloud run."""

    task: Literal["classification", "segmentation"] = "classification"
    # --- network (model.name picks the size: pointmetabase-s/l/xl/xxl/xxxl, pointnext-s/b/l/xl)
    radius: float | None = None  # first ball radius (null: 0.15 classification, 0.1 segmentation)
    radius_scaling: float | None = None  # radius growth per stage (null: 1.5 classification, 2 segmentation)
    nsample: int = 32  # K, neighbours per ball
    # --- inputs
    num_points: int = 1024  # classification: points per cloud
    features: Literal["auto", "xyz", "xyz_height", "rgb_height", "xyz_rgb_height"] = "auto"  # auto: xyz / rgb_height
    height_axis: Literal["x", "y", "z"] | None = None  # gravity axis of the height feature (null: y cls, z seg)
    # release: S3DIS training computes height from y while full-scene test uses z (the released code's mismatch)
    height_axis_release: bool = False
    center_normalize: bool = False  # classification: centre and scale into the unit sphere (ScanObjectNN)
    train_first_points: bool = False  # classification: train on the first num_points, shuffled (ModelNet40 loader)
    train_fps_points: int | None = None  # classification: FPS each training cloud to this many once (ScanObjectNN 1200)
    eval_fps: bool = False  # classification: FPS eval clouds to num_points once (ScanObjectNN); else the first points
    voxel_size: float = 0.04  # segmentation: voxel subsampling
    voxel_max: int = 24000  # segmentation: points per training crop
    loop: int = 30  # segmentation: crops per room per epoch
    test_area: int = 5  # S3DIS: the held-out area
    # --- augmentation (training)
    aug_scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    aug_anisotropic: bool = True
    aug_rotate: Literal["none", "y", "z"] = "z"
    aug_jitter: list[float] = field(default_factory=lambda: [0.005, 0.02])  # sigma, clip ([0, 0]: none)
    aug_shift: float = 0.0
    aug_color_drop: float = 0.2
    aug_auto_contrast: bool = True
    # --- loss and evaluation
    label_smoothing: float = 0.2  # OpenPoints' smooth CE: 1-eps on the target, eps/(classes-1) elsewhere
    eval_mode: Literal["voxel", "full"] = "voxel"  # segmentation: voxelised rooms, or every point (multi-pass)
    votes: int = 1  # classification: test-time votes (random scaling), 1 = none
    vote_scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    # --- built-in data (no data.path)
    # held-out set evaluated: val (selects checkpoints in training) or test (never seen by training or selection)
    builtin_split: Literal["val", "test"] = "val"
    builtin_per_class: int = 40  # classification: training clouds per class
    builtin_val_per_class: int = 10  # classification: held-out clouds per class
    builtin_rooms: int = 12  # segmentation: training rooms
    builtin_val_rooms: int = 4  # segmentation: held-out rooms
    builtin_room_points: int = 20000  # segmentation: points per built-in room
    builtin_points: int = 2048  # classification: points sampled per built-in cloud

    LIMITS: ClassVar[dict[str, str]] = {
        "radius": "> 0",
        "radius_scaling": "> 0",
        "nsample": ">= 1, <= 1024",
        "num_points": ">= 16, <= 10000000",
        "train_fps_points": ">= 8, <= 10000000",
        "voxel_size": "> 0",
        "voxel_max": ">= 64, <= 100000000",
        "loop": ">= 1, <= 100000",
        "test_area": ">= 1, <= 6",
        "aug_scale": "> 0",
        "aug_jitter": ">= 0",
        "aug_shift": ">= 0",
        "aug_color_drop": "[0, 1]",
        "label_smoothing": "[0, 1)",
        "votes": ">= 1, <= 1000",
        "vote_scale": "> 0",
        "builtin_per_class": ">= 1, <= 100000",
        "builtin_val_per_class": ">= 1, <= 100000",
        "builtin_rooms": ">= 1, <= 100000",
        "builtin_val_rooms": ">= 1, <= 100000",
        "builtin_room_points": ">= 256, <= 10000000",
        "builtin_points": ">= 64, <= 1000000",
    }

    def resolved_radius(self) -> float:
        return self.radius if self.radius is not None else (0.15 if self.task == "classification" else 0.1)

    def resolved_scaling(self) -> float:
        if self.radius_scaling is not None:
            return self.radius_scaling
        return 1.5 if self.task == "classification" else 2.0

    def resolved_features(self) -> str:
        if self.features != "auto":
            return self.features
        return "xyz" if self.task == "classification" else "rgb_height"

    def in_channels(self) -> int:
        return {"xyz": 3, "xyz_height": 4, "rgb_height": 4, "xyz_rgb_height": 7}[self.resolved_features()]

    def height_index(self, training: bool = False) -> int:
        axis = self.height_axis or ("y" if self.task == "classification" else "z")
        if self.height_axis_release and self.task == "segmentation" and training:
            axis = "y"
        return "xyz".index(axis)

    def validate(self, recipe: Any) -> None:
        """Cross-key checks (model name against the task, features against the task, pairs of numbers)."""
        models = SEG_MODELS if self.task == "segmentation" else CLS_MODELS
        if recipe.model.name == "deit_tiny_patch16_224":
            recipe.model.name = "pointmetabase-s"
        if recipe.model.name not in models:
            from evcli.recipe import did_you_mean

            raise RecipeError(
                f"model.name {recipe.model.name!r} is not a {self.task} model{did_you_mean(recipe.model.name, models)}",
                hint=f"choose one of {', '.join(models)}",
            )
        feats = self.resolved_features()
        if self.task == "classification" and feats not in ("xyz", "xyz_height"):
            raise RecipeError(f"pointcloud.features {feats!r} needs colours: classification takes xyz or xyz_height")
        if self.task == "segmentation" and feats not in ("rgb_height", "xyz_rgb_height"):
            raise RecipeError(f"pointcloud.features {feats!r}: segmentation takes rgb_height or xyz_rgb_height")
        for key in ("aug_scale", "vote_scale", "aug_jitter"):
            value = getattr(self, key)
            if len(value) != 2 or value[0] > value[1] and key != "aug_jitter":
                raise RecipeError(f"recipe key 'pointcloud.{key}' must be two numbers [low, high], got {value}")
        if recipe.train.best_metric == "auto":
            recipe.train.best_metric = "miou" if self.task == "segmentation" else "oa"
