import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from mrvi_pyro._metrics import adjusted_rand_index, auroc


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = rng.normal(size=200) + labels
    scores[:10] = scores[10:20]  # ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    a, b = rng.integers(0, 3, 100), rng.integers(0, 4, 100)
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b))
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc(np.ones(3), np.arange(3))
