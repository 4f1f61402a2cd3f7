"""Classification and segmentation metrics from a confusion matrix (numpy only)."""

from __future__ import annotations

import numpy as np


def confusion(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix (rows: actual, columns: predicted); entries outside [0, n) are ignored."""
    actual, predicted = np.asarray(actual).ravel(), np.asarray(predicted).ravel()
    keep = (actual >= 0) & (actual < n_classes) & (predicted >= 0) & (predicted < n_classes)
    flat = actual[keep].astype(np.int64) * n_classes + predicted[keep]
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def summarize(cm: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1, mIoU and per-class precision / recall / F1 / IoU / support."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    iou = _ratio(tp, support + predicted - tp)
    present = support > 0  # classes absent from the reference do not drag the macro averages
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "iou": round(float(iou[i]), 4),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def majority_baseline(train_counts: np.ndarray, cm_test: np.ndarray, class_names: list[str]) -> dict:
    """Scores of always predicting the training split's most frequent class on the test set."""
    majority = int(np.argmax(train_counts))
    support = np.asarray(cm_test).sum(axis=1)
    baseline = np.zeros_like(cm_test)
    baseline[:, majority] = support
    scores = summarize(baseline, class_names)
    return {"class": class_names[majority], **{k: scores[k] for k in ("accuracy", "macro_f1", "miou")}}
