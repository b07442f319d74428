import numpy as np
import torch

from transferlab.classifiers.svm import fit_svm, svm_to_linear


def _blobs(n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (n_classes, 16))
    y = np.repeat(np.arange(n_classes), 20)
    x = centers[y] + rng.normal(0, 1.5, (len(y), 16)) * rng.uniform(0.5, 5, 16)
    return x.astype(np.float32), y


def test_linear_layer_predicts_like_sklearn_multiclass():
    x, y = _blobs(4)
    fit = fit_svm(x, y, C_grid=(0.01, 0.1, 1.0), cv=3)
    assert set(fit.grid_scores) == {0.01, 0.1, 1.0}
    assert fit.best_C in fit.grid_scores
    linear = svm_to_linear(fit.pipeline)
    with torch.no_grad():
        logits = linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, fit.pipeline.decision_function(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits.argmax(1), fit.pipeline.predict(x))


def test_binary_svm_becomes_two_logits_with_the_same_argmax():
    x, y = _blobs(2, seed=3)
    fit = fit_svm(x, y, C_grid=(0.1,), cv=3)
    linear = svm_to_linear(fit.pipeline)
    assert linear.out_features == 2
    with torch.no_grad():
        pred = linear(torch.from_numpy(x)).argmax(1).numpy()
    np.testing.assert_array_equal(pred, fit.pipeline.predict(x))


def test_cv_loop_picks_what_grid_search_picks():
    """fit_svm writes GridSearchCV out (to count the fits on a bar): same scores, C, weights."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    x, y = _blobs(3, seed=5)
    grid = (0.001, 0.01, 0.1, 1.0)
    fit = fit_svm(x, y, C_grid=grid, cv=3, class_weight="balanced", seed=7)
    search = GridSearchCV(
        fit.pipeline,
        {"svc__C": list(grid)},
        cv=StratifiedKFold(3, shuffle=True, random_state=7),
    ).fit(x, y)
    assert fit.best_C == search.best_params_["svc__C"]
    assert list(fit.grid_scores.values()) == search.cv_results_["mean_test_score"].tolist()
    np.testing.assert_array_equal(
        fit.pipeline.named_steps["svc"].coef_, search.best_estimator_.named_steps["svc"].coef_
    )
