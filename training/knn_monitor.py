"""Online kNN monitor: weighted kNN top-1 of frozen pooled backbone features on a held-out split."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from training.config import Config
from training.data import eval_transform, labelled_splits, subset_indices
from training.metrics import knn_top1

__all__ = ["KnnMonitor", "backbone_features"]


class _Transformed(Dataset):
    def __init__(self, images: Dataset, transform: Any) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.images[i]
        return self.transform(img), label


@torch.no_grad()
def backbone_features(
    backbone: nn.Module,
    images: Dataset,
    transform: Any,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``(n, D)`` and labels ``(n,)`` of ``images`` through ``backbone`` in eval
    mode (its previous mode is restored)."""
    loader = DataLoader(
        _Transformed(images, transform), batch_size=batch_size, num_workers=num_workers
    )
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
            feats.append(backbone(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


class KnnMonitor:
    """kNN top-1 (in %) of a backbone on the config's labelled train / held-out splits, with the
    evaluation transform of the training resolution (:func:`training.data.eval_transform`)."""

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
        self.transform = eval_transform(pretrained_cfg)
        self.cfg, self.device = cfg, device

    def __call__(self, backbone: nn.Module) -> float:
        """kNN top-1 accuracy of ``backbone`` (in %)."""
        kw = dict(
            transform=self.transform,
            device=self.device,
            batch_size=self.cfg.knn.batch_size,
            num_workers=min(2, self.cfg.data.num_workers),
        )
        train_x, train_y = backbone_features(backbone, self.train, desc="kNN train", **kw)
        val_x, val_y = backbone_features(backbone, self.val, desc="kNN held-out", **kw)
        return knn_top1(train_x, train_y, val_x, val_y, self.cfg.knn.k, self.cfg.knn.temperature)
