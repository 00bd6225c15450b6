"""The linear probe: a linear classifier trained by SGD on frozen backbone features.

The protocol (the SSOLE recipe's, standard in the field): 100 epochs of SGD with momentum 0.9,
learning rate ``0.3 x batch / 256`` on a cosine schedule, no weight decay. Features are
standardised with the train set's mean and standard deviation first (as MAE's BatchNorm without
affine): the composition is still one linear map, but the fixed learning rate then suits backbones
whose feature scales differ by orders of magnitude (raw pixels, random init, trained nets).

Train features are either one fixed tensor (features of un-augmented images, the fast variant) or a
callable returning the features of a fresh augmentation of the train set for each epoch (the
random-resized-crop + flip variant; :mod:`training.evaluate` builds it).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["LinearProbe", "linear_probe_top1", "train_linear_probe"]

EpochFeatures = Callable[[int], torch.Tensor]
"""Returns the ``(n, d)`` train features for epoch ``e``, rows in the order of the labels."""


class LinearProbe(nn.Module):
    """Standardisation followed by one linear layer: ``fc((x - mean) / std)``.

    Args:
        mean: per-feature mean of the train features, shape ``(d,)``.
        std: per-feature standard deviation, shape ``(d,)``; zeros are replaced by one.
        num_classes: number of output classes.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", torch.where(std > 1e-6, std, torch.ones_like(std)).float())
        self.fc = nn.Linear(mean.shape[0], num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(n, num_classes)`` for ``(n, d)`` features."""
        return self.fc((features.float() - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
        """Predicted class indices for ``(n, d)`` features."""
        device = self.mean.device
        return torch.cat(
            [
                self(features[i : i + chunk_size].to(device)).argmax(1)
                for i in range(0, features.shape[0], chunk_size)
            ]
        )


def _check_features(name: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(
            f"{name} features must be a non-empty (n, d) matrix, got shape {tuple(features.shape)}"
        )
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"{name} labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}"
        )
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} features contain NaN or infinite values")


def train_linear_probe(
    train_features: torch.Tensor | EpochFeatures,
    train_labels: torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LinearProbe:
    """Train a :class:`LinearProbe` on frozen features with SGD and a cosine schedule.

    Args:
        train_features: ``(n, d)`` features, or a callable ``epoch -> (n, d)`` features of a fresh
            augmentation (standardisation statistics come from epoch 0).
        train_labels: ``(n,)`` class indices.
        num_classes: defaults to ``max(label) + 1``.
        epochs: passes over the train set.
        batch_size: mini-batch size.
        lr: base learning rate; defaults to ``0.3 * batch_size / 256``.
        momentum, weight_decay: SGD settings (the protocol uses no weight decay).
        device: where to train; defaults to the device of the features.
        seed: seeds the shuffling, so a run is reproducible.
        progress: show a tqdm bar over epochs.

    Returns:
        The trained probe, in eval mode, on ``device``.

    Raises:
        ValueError: on empty, mismatched or non-finite inputs, negative labels or bad settings.
    """
    lr = _checked_lr(epochs, batch_size, lr)
    epoch_features: EpochFeatures = (
        train_features if callable(train_features) else (lambda _epoch: train_features)
    )
    features = epoch_features(0)
    _check_features("train", features, train_labels)
    if int(train_labels.min()) < 0:
        raise ValueError("train labels must be class indices >= 0")
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    device = torch.device(device) if device is not None else features.device
    labels = train_labels.long().to(device)

    features = features.float().to(device)
    probe = LinearProbe(features.mean(0), features.std(0), num_classes).to(device)
    optimizer = torch.optim.SGD(
        probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    steps_per_epoch = math.ceil(features.shape[0] / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)

    generator = torch.Generator().manual_seed(seed)
    probe.train()
    bar = _epoch_bar(epochs, progress)
    for epoch in bar:
        if epoch > 0 and callable(train_features):
            features = epoch_features(epoch).float().to(device)
            _check_features("train", features, train_labels)
        order = torch.randperm(features.shape[0], generator=generator).to(device)
        with _one_cpu_thread(device):
            loss = _train_epoch(probe, optimizer, scheduler, features, labels, order, batch_size)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    return probe.eval()


def _checked_lr(epochs: int, batch_size: int, lr: float | None) -> float:
    """The learning rate (``lr``, or the protocol's ``0.3 * batch_size / 256``), once the settings
    are checked."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    lr = 0.3 * batch_size / 256 if lr is None else lr
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    return lr


def _epoch_bar(epochs: int, progress: bool) -> tqdm:
    """A progress bar over the epochs; in a log file (not a terminal) every redraw is another
    line, so it redraws rarely there."""
    redraw_s = 0.1 if sys.stderr.isatty() else 60.0
    return tqdm(
        range(epochs), desc="linear probe", unit="epoch", disable=not progress, mininterval=redraw_s
    )


def _train_epoch(
    probe: LinearProbe,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    features: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
) -> float:
    """One pass over ``features`` in ``order``, one SGD and schedule step per mini-batch; returns
    the epoch's mean loss."""
    total = torch.zeros((), device=features.device)
    for start in range(0, features.shape[0], batch_size):
        idx = order[start : start + batch_size]
        loss = F.cross_entropy(probe(features[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach() * idx.numel()
    return float(total) / features.shape[0]


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    # A probe step multiplies tiny matrices: on CPU, fanning them out over threads costs far more
    # in synchronisation than it saves (tens of times slower on a busy machine).
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear_probe_top1(
    train_features: torch.Tensor | EpochFeatures,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    **kwargs,
) -> float:
    """Top-1 accuracy (in %) on the test set of a probe trained by :func:`train_linear_probe`
    (``kwargs`` are passed to it).

    Raises:
        ValueError: as :func:`train_linear_probe`, or on an empty or mismatched test set.
    """
    _check_features("test", test_features, test_labels)
    num_classes = kwargs.pop("num_classes", None) or int(
        max(int(train_labels.max()), int(test_labels.max())) + 1
    )
    probe = train_linear_probe(train_features, train_labels, num_classes=num_classes, **kwargs)
    pred = probe.predict(test_features)
    return float((pred.cpu() == test_labels.cpu()).float().mean() * 100)
