"""Metrics against confusion matrices worked out by hand."""

import numpy as np
import pytest

from tilepipe.ml.metrics import confusion, majority_baseline, summarize

CLASSES = ["a", "b", "c"]
# rows actual, columns predicted; the last two pairs fall outside [0, 3) and are ignored
ACTUAL = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, -1, 5])
PREDICTED = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2, 0, 0])
CM = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 3]])


def test_confusion_counts_pairs_and_ignores_out_of_range():
    assert confusion(ACTUAL, PREDICTED, 3).tolist() == CM.tolist()
    assert confusion(ACTUAL.reshape(1, -1), PREDICTED.reshape(1, -1), 3).tolist() == CM.tolist()


def test_summary_of_a_hand_computed_matrix():
    s = summarize(CM, CLASSES)
    assert s["accuracy"] == pytest.approx(6 / 9)
    # precision = recall here: column sums equal row sums (3, 2, 4)
    assert [s["per_class"][c]["f1"] for c in CLASSES] == [0.6667, 0.5, 0.75]
    assert [s["per_class"][c]["iou"] for c in CLASSES] == [0.5, 0.3333, 0.6]  # 2/4, 1/3, 3/5
    assert [s["per_class"][c]["support"] for c in CLASSES] == [3, 2, 4]
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert s["miou"] == pytest.approx((2 / 4 + 1 / 3 + 3 / 5) / 3)


def test_a_class_absent_from_the_reference_does_not_drag_the_averages():
    cm = confusion(np.array([0, 0, 1]), np.array([0, 2, 1]), 3)  # c never occurs, is predicted once
    s = summarize(cm, CLASSES)
    assert s["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0, "support": 0}
    assert s["per_class"]["a"]["precision"] == 1.0 and s["per_class"]["a"]["recall"] == 0.5
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["miou"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["accuracy"] == pytest.approx(2 / 3)


def test_empty_matrix_scores_zero():
    s = summarize(np.zeros((3, 3), dtype=np.int64), CLASSES)
    assert (s["accuracy"], s["macro_f1"], s["miou"]) == (0.0, 0.0, 0.0)


def test_majority_baseline_predicts_the_most_frequent_training_class():
    b = majority_baseline(np.array([5, 1, 1]), CM, CLASSES)
    assert b["class"] == "a"
    assert b["accuracy"] == pytest.approx(3 / 9)
    assert b["macro_f1"] == pytest.approx(0.5 / 3)  # a: precision 3/9, recall 1 -> F1 0.5; b, c: 0
    assert b["miou"] == pytest.approx((3 / 9) / 3)
