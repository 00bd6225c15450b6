"""Online kNN monitor: weighted kNN top-1 of frozen pooled backbone features on a held-out split."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ssole_hub.preprocessing import resolve_preprocessing
from training.config import Config
from training.data import TransformedDataset, labelled_splits, subset_indices
from training.evaluate import extract_features
from training.metrics import knn_top1

__all__ = ["KnnMonitor"]


class KnnMonitor:
    """kNN top-1 (in %) of a backbone on the config's labelled train / held-out splits, with the
    evaluation transform of the training resolution (the one resolver,
    :func:`ssole_hub.preprocessing.resolve_preprocessing`, of the run's ``pretrained_cfg``)."""

    def __init__(self, cfg: Config, pretrained_cfg: dict[str, Any], device: torch.device) -> None:
        d = cfg.data
        train, val = labelled_splits(
            d.dataset,
            d.root,
            d.val_root,
            synthetic_images=d.synthetic_images,
            synthetic_size=d.synthetic_size,
        )
        self.train = Subset(train, subset_indices(len(train), cfg.knn.max_train_images))
        self.val = Subset(val, subset_indices(len(val), cfg.knn.max_val_images))
        self.transform = resolve_preprocessing(pretrained_cfg).transform
        self.cfg, self.device = cfg, device

    def __call__(self, backbone: nn.Module) -> float:
        """kNN top-1 accuracy of ``backbone`` (in %)."""

        def features(images: Dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
            loader = DataLoader(
                TransformedDataset(images, self.transform),
                batch_size=self.cfg.knn.batch_size,
                num_workers=min(2, self.cfg.data.num_workers),
            )
            return extract_features(backbone, loader, self.device, desc=desc)

        train_x, train_y = features(self.train, "kNN train")
        val_x, val_y = features(self.val, "kNN held-out")
        return knn_top1(train_x, train_y, val_x, val_y, self.cfg.knn.k, self.cfg.knn.temperature)
