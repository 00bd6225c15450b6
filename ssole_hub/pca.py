"""Shorter embeddings by PCA: fit on a set of embeddings, project to ``k`` dimensions, keep as
safetensors.

SSOLE features are not trained to be truncated (their first ``k`` coordinates are worth no more
than any other ``k``), so a size below the model's width comes from a PCA fitted on the user's
own images, optionally with whitening, the practice for self-supervised features in retrieval
(Jégou & Chum, ECCV 2012; DINO's copy detection). Embeddings are L2-normalised before the PCA
and again after the projection (and the whitening), so every size gives unit vectors.

A hub folder keeps its fitted PCA in :data:`PCA_FILE`: ``mean`` ``(d,)``, ``components``
``(m, d)`` (principal axes, largest variance first) and ``variances`` ``(m,)`` as float32
tensors, with the output it was fitted on, the image count, the total variance and the whitening
choice in the file's metadata.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

__all__ = ["PCA", "PCA_FILE", "SIZES", "fit_pca"]

PCA_FILE = "pca.safetensors"
"""The file a hub folder keeps its fitted PCA in."""
SIZES = (512, 256, 128, 64, 32)
"""The sizes whose figures are recorded and shown (those a PCA offers): any size from 1 to
:attr:`PCA.max_dimensions` works."""
_EPS = 1e-12


@dataclass(frozen=True)
class PCA:
    """A PCA of L2-normalised embeddings of one model output.

    Attributes:
        mean: ``(d,)`` mean of the L2-normalised embeddings it was fitted on.
        components: ``(m, d)`` unit principal axes, by decreasing variance.
        variances: ``(m,)`` the variance along each axis.
        total_variance: the embeddings' total variance (so that :meth:`variance_kept` is the
            share of all of it, not only of the ``m`` axes kept).
        whiten: divide each coordinate by its standard deviation before the final L2
            normalisation.
        output: the model output it applies to (``"backbone"`` or ``"projector"``).
        images: how many images it was fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    total_variance: float
    whiten: bool
    output: str
    images: int

    @property
    def max_dimensions(self) -> int:
        """The largest size it projects to: the number of principal axes kept."""
        return int(self.components.shape[0])

    @property
    def input_dimensions(self) -> int:
        """The width of the embeddings it applies to."""
        return int(self.components.shape[1])

    def variance_kept(self, k: int) -> float:
        """Share of the embeddings' total variance that the first ``k`` axes keep."""
        self.check_dimensions(k)
        return float(self.variances[:k].sum() / max(self.total_variance, _EPS))

    def variance_table(self) -> dict[int, float]:
        """:meth:`variance_kept` at each of :data:`SIZES` it offers, and at its largest size,
        largest first."""
        sizes = {k for k in SIZES if k <= self.max_dimensions} | {self.max_dimensions}
        return {k: self.variance_kept(k) for k in sorted(sizes, reverse=True)}

    def digest(self) -> str:
        """16 hex digits that change with any of its numbers or its whitening choice."""
        h = hashlib.sha256(f"{self.whiten} {self.output} {self.total_variance!r}".encode())
        for array in (self.mean, self.components, self.variances):
            h.update(np.ascontiguousarray(array, np.float32).tobytes())
        return h.hexdigest()[:16]

    def check_dimensions(self, k: int) -> None:
        """Raise :class:`ValueError` naming the valid range unless ``1 <= k <= max_dimensions``."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"dimensions must be an integer, got {k!r}")
        if not 1 <= k <= self.max_dimensions:
            raise ValueError(
                f"dimensions must be between 1 and {self.max_dimensions} (the sizes this "
                f"model's PCA offers), got {k}"
            )

    def transform(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        """Project ``(n, d)`` embeddings (of :attr:`output`, normalised or not) to ``(n, k)``
        float32 unit vectors: L2-normalise, centre, project on the first ``k`` axes, whiten if
        chosen, L2-normalise.

        Raises:
            ValueError: ``k`` out of range, or embeddings of another width.
        """
        self.check_dimensions(k)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dimensions:
            raise ValueError(
                f"this PCA applies to {self.input_dimensions}-d {self.output} embeddings, got "
                f"shape {tuple(embeddings.shape)}"
            )
        x = torch.nn.functional.normalize(embeddings.float(), dim=1)
        mean = torch.from_numpy(self.mean).to(x.device)
        axes = torch.from_numpy(self.components[:k]).to(x.device)
        y = (x - mean) @ axes.T
        if self.whiten:
            y = y / torch.from_numpy(np.sqrt(self.variances[:k] + _EPS)).to(x.device)
        return torch.nn.functional.normalize(y, dim=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write it as one safetensors file (tensors float32, the rest as metadata)."""
        tensors = {"mean": self.mean, "components": self.components, "variances": self.variances}
        metadata = {
            "total_variance": repr(float(self.total_variance)),
            "whiten": str(self.whiten).lower(),
            "output": self.output,
            "images": str(int(self.images)),
        }
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            path,
            metadata=metadata,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCA:
        """Read a file :meth:`save` wrote.

        Raises:
            ValueError: the file lacks a tensor or a metadata key, or their shapes disagree.
        """
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
        try:
            pca = cls(
                mean=tensors["mean"],
                components=tensors["components"],
                variances=tensors["variances"],
                total_variance=float(metadata["total_variance"]),
                whiten=metadata["whiten"] == "true",
                output=metadata["output"],
                images=int(metadata["images"]),
            )
        except KeyError as e:
            raise ValueError(f"{os.fspath(path)} is not a PCA file: it lacks {e}") from None
        m, d = pca.components.shape if pca.components.ndim == 2 else (-1, -1)
        if pca.mean.shape != (d,) or pca.variances.shape != (m,):
            raise ValueError(
                f"{os.fspath(path)}: shapes disagree (mean {pca.mean.shape}, components "
                f"{pca.components.shape}, variances {pca.variances.shape})"
            )
        return pca


def fit_pca(embeddings: np.ndarray | torch.Tensor, *, output: str, whiten: bool = False) -> PCA:
    """Fit a PCA on ``(n, d)`` embeddings of one model output (L2-normalised first).

    It keeps ``min(n - 1, d)`` axes: the ones ``n`` images can estimate. Computed in float64
    from the ``d x d`` covariance.

    Raises:
        ValueError: fewer than 2 embeddings, or values that are not finite.
    """
    x = torch.as_tensor(embeddings).double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"fitting a PCA needs at least 2 embeddings (n, d), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the embeddings to fit a PCA on have NaN or infinite values")
    x = torch.nn.functional.normalize(x, dim=1)
    mean = x.mean(0)
    centred = x - mean
    covariance = centred.T @ centred / (x.shape[0] - 1)
    variances, axes = torch.linalg.eigh(covariance)
    keep = min(x.shape[0] - 1, x.shape[1])
    order = torch.argsort(variances, descending=True)[:keep]
    return PCA(
        mean=mean.float().numpy(),
        components=axes[:, order].T.float().contiguous().numpy(),
        variances=variances[order].clamp_min(0).float().numpy(),
        total_variance=float(torch.diagonal(covariance).sum()),
        whiten=whiten,
        output=output,
        images=int(x.shape[0]),
    )
