"""Segmentation metrics from a confusion matrix accumulated over batches.

Pixels whose target or prediction is the ignore index are left out on both sides. IoU of a class
that appears in neither target nor prediction is NaN and does not count towards mIoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rsdiff.data.classmap import IGNORE_INDEX


class ConfusionMatrix:
    """``matrix[true, pred]`` pixel counts for ``num_classes`` classes."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add predictions and targets of any equal shape (numpy arrays or tensors)."""
        p = np.asarray(pred.cpu() if hasattr(pred, "cpu") else pred).ravel().astype(np.int64)
        t = np.asarray(target.cpu() if hasattr(target, "cpu") else target).ravel().astype(np.int64)
        keep = (t != self.ignore_index) & (p != self.ignore_index) & (t >= 0) & (t < self.num_classes)
        keep &= (p >= 0) & (p < self.num_classes)
        self.matrix += np.bincount(
            t[keep] * self.num_classes + p[keep], minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN where the class is absent from both sides."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def f1(self) -> np.ndarray:
        """Per-class F1 = 2 TP / (2 TP + FP + FN); NaN where absent from both sides."""
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * tp / denom, np.nan)

    def precision(self) -> np.ndarray:
        """Per-class precision = TP / (TP + FP): of the pixels called that class, the share that is;
        NaN where the class is never predicted."""
        tp = np.diag(self.matrix).astype(np.float64)
        called = self.matrix.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(called > 0, tp / called, np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0

    def overall_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else 0.0

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """mIoU, OA, macro F1 and per-class IoU/F1 as plain numbers (NaN -> None)."""
        names = list(class_names or [str(i) for i in range(self.num_classes)])
        f1 = self.f1()

        def clean(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return {
            "miou": self.miou(),
            "overall_accuracy": self.overall_accuracy(),
            "macro_f1": float(np.nanmean(f1)) if np.isfinite(f1).any() else 0.0,
            "iou": {n: clean(v) for n, v in zip(names, self.iou())},
            "f1": {n: clean(v) for n, v in zip(names, f1)},
            "pixels": int(self.matrix.sum()),
        }

    def plot(self, class_names: Sequence[str] | None = None, title: str = "") -> Any:
        """A matplotlib figure: row-normalised confusion matrix with counts (its diagonal is each
        class's recall), each true class labelled with its IoU and each predicted class with its
        precision, so a class that takes other classes' pixels does not read as perfect."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(class_names or [str(i) for i in range(self.num_classes)])
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = self.matrix / np.maximum(self.matrix.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{norm[i, j]:.2f}\n{self.matrix[i, j]}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip

        def score(v: float) -> str:
            return "-" if np.isnan(v) else f"{v:.2f}"

        precision = [f"{n}\nprecision {score(v)}" for n, v in zip(names, self.precision())]
        ax.set_xticks(range(len(names)), precision, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), [f"{n}\nIoU {score(v)}" for n, v in zip(names, self.iou())])
        ax.set_xlabel("predicted (precision: share of the pixels called that class that are)")
        ax.set_ylabel("true (diagonal: recall)")
        ax.set_title(title or f"mIoU {self.miou():.3f}  OA {self.overall_accuracy():.3f}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        return fig


def worst_class(iou: dict[str, float | None], where: str = "") -> str:
    """``"worst class{where}: NAME (IoU 0.62)"`` for per-class IoUs by name (None or NaN: absent
    from both sides, left out); ``""`` when no class has one."""
    scored = {n: float(v) for n, v in iou.items() if v is not None and np.isfinite(v)}
    if not scored:
        return ""
    name = min(scored, key=scored.get)
    return f"worst class{where}: {name} (IoU {scored[name]:.2f})"
