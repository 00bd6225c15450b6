"""RankMe and the weighted kNN, checked against independent computations on real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from training.metrics import knn_predict, knn_top1, rankme


def test_knn_matches_scikit_learn_weighted_cosine_knn_on_digits(digits_split):
    xtr, ytr, xte, yte = digits_split
    k, t = 20, 0.07
    sk = KNeighborsClassifier(
        n_neighbors=k,
        metric="cosine",
        algorithm="brute",
        # scikit-learn hands over cosine distances 1 - sim; DINO's vote weight is exp(sim / T).
        weights=lambda d: np.exp((1 - d) / t),
    ).fit(xtr.numpy(), ytr.numpy())
    expected = sk.predict(xte.numpy())

    ours = knn_predict(xtr.float(), ytr, xte.float(), k=k, temperature=t).numpy()

    assert (ours == expected).mean() >= 0.995  # ties in distance may be broken differently
    sk_top1 = (expected == yte.numpy()).mean() * 100
    assert knn_top1(xtr.float(), ytr, xte.float(), yte, k, t) == pytest.approx(sk_top1, abs=0.5)


def test_knn_with_k_one_returns_the_label_of_the_nearest_train_sample(digits_split):
    xtr, ytr, xte, _ = digits_split
    a = torch.nn.functional.normalize(xte.float(), dim=1)
    b = torch.nn.functional.normalize(xtr.float(), dim=1)
    nearest = ytr[(a @ b.T).argmax(1)]
    assert torch.equal(knn_predict(xtr.float(), ytr, xte.float(), k=1), nearest)


def test_knn_k_larger_than_the_train_set_uses_every_sample():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    pred = knn_predict(train, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), k=50)
    assert pred.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("train", "labels", "test", "kwargs", "message"),
    [
        (torch.ones(4, 3), torch.zeros(4), torch.ones(2, 5), {}, "equal d"),
        (torch.ones(4, 3), torch.zeros(3), torch.ones(2, 3), {}, "train_labels"),
        (torch.ones(4, 3), torch.zeros(4), torch.ones(2, 3), {"k": 0}, "k must be"),
        (torch.ones(4, 3), torch.zeros(4), torch.ones(2, 3), {"temperature": 0.0}, "temperature"),
        (torch.ones(4, 3), -torch.ones(4), torch.ones(2, 3), {}, "labels"),
        (torch.full((4, 3), float("nan")), torch.zeros(4), torch.ones(2, 3), {}, "NaN"),
    ],
)
def test_knn_rejects_bad_input_with_a_clear_error(train, labels, test, kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn_predict(train, labels, test, **kwargs)


@pytest.mark.parametrize("r", [1, 5, 32])
def test_rankme_of_a_rank_r_matrix_with_equal_singular_values_is_r(r):
    g = torch.Generator().manual_seed(r)
    u = torch.linalg.qr(torch.randn(500, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(64, r, generator=g, dtype=torch.float64))[0]
    assert rankme((u @ v.T).float()) == pytest.approx(r, rel=0.01)


def test_rankme_of_a_random_rank_r_matrix_is_at_most_r_and_near_it():
    g = torch.Generator().manual_seed(0)
    r = 16
    x = torch.randn(1000, r, generator=g) @ torch.randn(r, 128, generator=g)
    value = rankme(x)
    assert 0.7 * r < value <= r + 1e-3


def test_rankme_of_collapsed_embeddings_is_one_and_of_diverse_ones_is_high():
    g = torch.Generator().manual_seed(0)
    collapsed = torch.randn(1, 32, generator=g).expand(200, 32)
    diverse = torch.randn(200, 32, generator=g)
    assert rankme(collapsed) == pytest.approx(1.0, abs=0.01)
    assert rankme(diverse) > 25


@pytest.mark.parametrize(
    "bad", [torch.empty(0, 4), torch.ones(3), torch.tensor([[1.0, float("inf")]])]
)
def test_rankme_rejects_empty_non_matrix_or_non_finite_input(bad):
    with pytest.raises(ValueError):
        rankme(bad)
