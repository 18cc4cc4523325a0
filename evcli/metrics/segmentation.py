"""Confusion-matrix metrics of classification and semantic segmentation (OA, mAcc, IoU per class, mIoU), as
sums the engine adds up over batches and processes.

As OpenPoints: OA = sum TP / sum count; mAcc = mean over classes of TP_c / count_c; IoU_c = TP_c / (TP_c +
FP_c + FN_c); mIoU is the mean over **all** classes (a class absent from the data and never predicted counts
as 0, like S3DIS Area 5 "beam"). Targets equal to ``ignore_index`` are left out.
"""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = -100
) -> torch.Tensor:
    """(classes, classes) counts, rows = target, columns = prediction (float64, ready for summing)."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if len(target) and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target.max()) if int(target.max()) >= num_classes else int(target.min())
        raise ValueError(f"label {bad} outside the class range 0..{num_classes - 1}")
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).to(torch.float64)


def confusion_summary(cm: torch.Tensor) -> dict[str, float]:
    """OA, mAcc and mIoU in percent of a summed confusion matrix, and the number of targets counted."""
    cm = cm.double()
    tp = cm.diag()
    count = cm.sum(1)
    predicted = cm.sum(0)
    union = count + predicted - tp
    acc = torch.where(count > 0, tp / count.clamp_min(1), torch.zeros_like(tp))
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
    total = float(count.sum())
    return {
        "oa": 100.0 * float(tp.sum()) / total if total else 0.0,
        "macc": 100.0 * float(acc.mean()),
        "miou": 100.0 * float(iou.mean()),
        "count": total,  # samples (classification) or points (segmentation) evaluated
    }


def per_class_table(cm: torch.Tensor, classes: list[str]) -> list[dict[str, float | str]]:
    """One row per class: name, points (target count), accuracy and IoU in percent."""
    cm = cm.double()
    tp, count, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    union = count + predicted - tp
    rows = []
    for i in range(len(cm)):
        rows.append(
            {
                "class": classes[i] if i < len(classes) else str(i),
                "count": int(count[i]),
                "acc": 100.0 * float(tp[i] / count[i]) if count[i] > 0 else 0.0,
                "iou": 100.0 * float(tp[i] / union[i]) if union[i] > 0 else 0.0,
            }
        )
    return rows
