"""Label-free and labelled measures of feature quality: RankMe and the weighted kNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_top1", "rankme"]


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: the effective rank ``exp(entropy(p))`` with ``p = s / sum(s)`` from the singular values
    of the ``(n, d)`` embedding matrix (Garrido et al., 2023). Between 1 and ``min(n, d)``.

    Raises:
        ValueError: if ``embeddings`` is not a non-empty, finite 2-D matrix.
    """
    if embeddings.ndim != 2 or embeddings.numel() == 0:
        raise ValueError(
            f"rankme needs a non-empty (n, d) matrix, got shape {tuple(embeddings.shape)}"
        )
    _check_finite("embeddings", embeddings)
    s = torch.linalg.svdvals(embeddings.detach().double())
    p = s / s.sum().clamp_min(eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """DINO's weighted kNN: cosine similarity on L2-normalised features, the ``k`` nearest train
    samples vote for their label with weight ``exp(sim / temperature)``. Returns predicted labels
    on the device of ``train_features`` (put both feature sets on a GPU to run it there).

    Raises:
        ValueError: on mismatched shapes, non-finite features, negative labels, ``k < 1`` or
            ``temperature <= 0``.
    """
    if (
        train_features.ndim != 2
        or test_features.ndim != 2
        or train_features.shape[1] != test_features.shape[1]
    ):
        raise ValueError(
            f"features must be (n, d) with equal d, got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("knn needs at least one train sample")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must be ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(train_labels.min()) < 0:
        raise ValueError("train_labels must be class indices >= 0")
    _check_finite("train features", train_features)
    _check_finite("test features", test_features)
    k = min(k, train_features.shape[0])
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    preds = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(
            test_features[start : start + chunk_size].float().to(train.device), dim=1
        )
        sim, idx = (test @ train.T).topk(k, dim=1)
        # Subtracting the row max leaves the vote unchanged and keeps exp() finite for small T.
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, labels[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=train.device)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (in %) of :func:`knn_predict` on the test set.

    Raises:
        ValueError: as :func:`knn_predict`, or if the test set is empty or its labels do not
            match its features.
    """
    if test_labels.shape != (test_features.shape[0],) or test_features.shape[0] == 0:
        raise ValueError(
            f"test_labels must be ({test_features.shape[0]},) for a non-empty test set, "
            f"got {tuple(test_labels.shape)}"
        )
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return float((pred.cpu() == test_labels.cpu()).float().mean() * 100)
