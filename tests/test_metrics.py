"""Metrics agree with scikit-learn and a direct softmax cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from imgclf.metrics import classification_metrics, f1_macro, softmax_cross_entropy


def test_f1_macro_is_sklearns_and_counts_absent_classes():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    assert f1_macro(y_true, y_pred, 3) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    # class 3 never appears: it scores 0 and pulls the macro mean down, as over the full label set
    assert f1_macro(y_true, y_pred, 4) == pytest.approx(f1_score(y_true, y_pred, average="macro") * 3 / 4)


def test_cross_entropy_matches_definition_and_is_stable():
    logits = np.array([[2.0, 1.0, 0.0], [1000.0, 0.0, -1000.0]])
    y = np.array([0, 1])
    p0 = np.exp(2) / (np.exp(2) + np.exp(1) + 1)
    assert softmax_cross_entropy(y, logits) == pytest.approx((-np.log(p0) + 1000.0) / 2)


def test_classification_metrics_report():
    classes = ["cat", "dog"]
    y = np.array([0, 0, 1, 1])
    logits = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], np.float32)
    res = classification_metrics(y, logits, classes)
    assert res["accuracy"] == 0.75 and res["count"] == 4
    assert res["confusion_matrix"] == [[1, 1], [0, 2]]
    assert res["per_class"]["cat"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert res["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
