"""The SSOLE loss (Huang, Qiu & Sapiro, ICLR 2025), computed exactly and fast.

Nuclear norms here never go through a generic SVD. A ``k x n`` matrix's nuclear norm is the sum
of the square roots of the eigenvalues of its smaller Gram matrix, a ``min(k, n)``-sized
symmetric eigenproblem solved in float64. The gradient is the exact one, ``U V^T`` over the
non-zero singular values, written as a custom backward that costs one more matrix product:
``U V^T = (Q diag(1/s) Q^T) X`` with ``X X^T = Q diag(s^2) Q^T``.

The low-rank term multiplies each image's ``N x d`` views on the left by a Helmert contrast (an
``(N-1) x N`` matrix with orthonormal rows orthogonal to the all-ones vector). Its singular values
are exactly the non-zero singular values of the centred views, so no mean is formed and the
centred matrix's spurious zero singular value, whose arbitrary singular vectors a generic SVD
backward would add to the gradient, never appears.

Precision: eigenproblems always run in float64. The high-rank term's two big products (Gram
and gradient) run in float32 only when every view matrix is well-conditioned and not near the
orthogonal end, where that is exact to ~1e-6; otherwise (collapse, near-collapse, duplicates)
they run in float64, because a float32 Gram matrix loses the small eigenvalues.

Two variants put the paper's design choices to the test (``objective`` and ``centering`` of
:func:`ssole_loss`): ``centering="none"`` takes the low-rank term on the raw views (the identity
instead of the Helmert contrast, so the ``N x N`` Gram of ``Z_i``), and
``objective="coupled_ole"`` is the OLE loss the paper starts from, whose high-rank term is the
nuclear norm of all ``b N`` views in one matrix (via its smaller Gram matrix).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "LOW_RANK_CENTERINGS",
    "OBJECTIVES",
    "SSOLELoss",
    "SSOLELossParts",
    "nuclear_norm",
    "ssole_loss",
]

OBJECTIVES = ("ssole", "coupled_ole")
"""``ssole``: the paper's loss. ``coupled_ole``: the OLE loss it starts from (see
:class:`SSOLELoss`)."""
LOW_RANK_CENTERINGS = ("mean", "none")
"""The SSOLE low-rank term on the views minus their mean (``mean``, the paper's) or on the raw
views (``none``)."""

# Eigenvalues of a float64 Gram matrix below `k * _EIG_FLOOR * largest` are rounding noise (the
# Gram squares the condition number): they count as zero singular values in value and gradient.
# This keeps singular values down to ~1e-6 of the largest, far below anything float32 carries.
_EIG_FLOOR = 8 * torch.finfo(torch.float64).eps

# A view matrix whose squared singular values all lie within this factor of the largest is
# well-conditioned enough for float32 products: Gram rounding ~eps32 * largest then moves each
# eigenvalue by ~eps32 / 1e-2 relative at worst, and the gradient product by ~eps32 * 10.
_FLOAT32_GRAM_RANGE = 1e-2
# ... and so is one whose nuclear norm R stays below (1 - this) * b (see ``ssole_loss``).
_NEAR_ORTHOGONAL = 1e-3

# Rows must be unit-norm; the slack admits embeddings normalised in bfloat16 and then upcast.
_UNIT_NORM_TOL = 1e-2

_warned_more_images_than_dims = False


class SSOLELossParts(NamedTuple):
    """The SSOLE loss and the parts worth logging; every field is a 0-d tensor.

    The field notes are SSOLE's; for ``objective="coupled_ole"`` the fields are
    ``loss = loss_low - lambda_ * loss_high``, ``loss_low = mean_i ||Z_i||_* / N``,
    ``loss_high = ||Z_all||_* / (b N)``, ``rank_low = mean_i ||Z_i||_*`` and
    ``rank_high = ||Z_all||_*`` (see :class:`SSOLELoss`).
    """

    loss: torch.Tensor
    """``loss_low + lambda_ * loss_high``; the only part to call ``backward()`` on."""
    loss_low: torch.Tensor
    """Mean over this process's images of ``r_i^2 / (N - 1)^2``; 0 when all views agree."""
    loss_high: torch.Tensor
    """Mean over views of the high-rank term; 1 at collapse, 0 for orthogonal images."""
    rank_low: torch.Tensor
    """Mean nuclear norm ``r_i`` of the centred views of one image."""
    rank_high: torch.Tensor
    """Mean nuclear norm ``R_v`` of one view across all (gathered) images."""


def _singular_values(
    gram: torch.Tensor, scale: torch.Tensor | None, vectors: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Singular values (and the Gram's eigenvectors if ``vectors``) from a float64 Gram matrix.

    Eigenvalues below ``k * _EIG_FLOOR * scale`` (``scale`` defaults to the largest eigenvalue)
    are rounding noise, since the Gram squares the condition number: they become exact zeros.
    That keeps singular values down to ~1e-6 of the scale's square root, far below float32's.
    """
    if vectors:
        eigvals, eigvecs = torch.linalg.eigh(gram)
    else:
        eigvals, eigvecs = torch.linalg.eigvalsh(gram), None
    scale = eigvals[..., -1:] if scale is None else scale[..., None]
    floor = scale * (_EIG_FLOOR * gram.shape[-1])
    return torch.where(eigvals > floor, eigvals, 0.0).sqrt(), eigvecs


def _inverse_root(
    eigvecs: torch.Tensor, singular: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """``Q diag(grad / s) Q^T`` over the non-zero singular values ``s``.

    For ``X X^T = Q diag(s^2) Q^T`` this maps ``X`` to ``grad * U V^T``, the exact gradient of
    ``grad * ||X||_*``: the upstream gradient is folded into this small matrix so that the big
    product with ``X`` happens once.
    """
    nonzero = singular > 0
    scale = torch.where(nonzero, grad[..., None] / torch.where(nonzero, singular, 1.0), 0.0)
    return (eigvecs * scale[..., None, :]) @ eigvecs.mT


class _NuclearNorm(torch.autograd.Function):
    """Nuclear norms of a float64 batch ``(..., k, n)`` via the smaller Gram matrix."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        wide = x.shape[-2] <= x.shape[-1]
        gram = x @ x.mT if wide else x.mT @ x
        if not torch.isfinite(gram).all():
            # Every entry of x reaches the Gram diagonal, so this catches any NaN or inf in x.
            raise ValueError("nuclear_norm: x contains non-finite values (NaN or inf)")
        singular, eigvecs = _singular_values(gram, None, ctx.needs_input_grad[0])
        ctx.wide = wide
        ctx.save_for_backward(x, eigvecs, singular)
        return singular.sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, eigvecs, singular = ctx.saved_tensors
        w = _inverse_root(eigvecs, singular, grad)
        return w @ x if ctx.wide else x @ w


def nuclear_norm(x: torch.Tensor) -> torch.Tensor:
    """Nuclear norms (sums of singular values) of a batch of matrices, exactly and fast.

    Solves the eigenproblem of the smaller Gram matrix in float64 instead of running an SVD, and
    back-propagates the exact gradient ``U V^T`` over the non-zero singular values (singular
    values below ~1e-6 of the largest count as zero; a generic SVD backward instead adds an
    arbitrary singular-vector pair for every zero singular value).

    Args:
        x: ``(..., k, n)`` floating-point tensor.

    Returns:
        ``(...)`` tensor of nuclear norms, in ``x``'s dtype.

    Raises:
        ValueError: if ``x`` has fewer than 2 dimensions, is not floating point, or contains
            NaN or inf.
    """
    if x.ndim < 2:
        raise ValueError(f"nuclear_norm: x must be (..., k, n), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"nuclear_norm: x must be floating point, got {x.dtype}")
    return _NuclearNorm.apply(x.to(torch.float64)).to(x.dtype)


def _well_conditioned(singular: torch.Tensor) -> bool:
    """Whether every matrix's squared singular values lie within ``_FLOAT32_GRAM_RANGE`` of
    its largest: then a float32 Gram matrix and gradient product are exact to ~1e-6."""
    squared = singular.square()
    return bool((squared[..., 0] >= _FLOAT32_GRAM_RANGE * squared[..., -1]).all())


class _SSOLENuclearNorms(torch.autograd.Function):
    """Both SSOLE nuclear norms of ``z_all`` ``(b, N, d)``, in float64: ``r`` of the images in
    ``local`` (their views multiplied on the left by ``contrast``: the Helmert contrast for
    centred views, the identity for raw ones) and ``R`` of every view across all b images.

    The high-rank term holds the two big products (its Gram matrix and the gradient). They run
    in the input's precision when every view matrix is well-conditioned, which is exact to
    ~1e-6 there, and in float64 otherwise (collapsed, near-collapsed or rank-deficient
    batches), where a float32 Gram matrix would lose the small eigenvalues. The low-rank Gram
    always comes from a float64 ``Z Z^T``, which also gives the row norms for the input check.
    """

    @staticmethod
    def forward(
        ctx, z_all: torch.Tensor, local: slice, contrast: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images64 = z_all.to(torch.float64)
        image_gram = images64 @ images64.mT  # (b, N, N)
        _check_row_norms(image_gram.diagonal(dim1=-2, dim2=-1), z_all)

        # H (Z Z^T) H^T is the Gram of the contrasted views; its rounding is relative to Z Z^T,
        # whose trace (the sum of squared row norms) is therefore the floor's scale.
        local_gram = image_gram[local]
        low_gram = contrast @ local_gram @ contrast.mT  # (B, N-1, N-1)
        low_scale = local_gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        need_grad = ctx.needs_input_grad[0]
        s_low, q_low = _singular_values(low_gram, low_scale, need_grad)

        views = z_all.transpose(0, 1)  # (N, b, d), no copy
        wide = views.shape[-2] <= views.shape[-1]
        high_gram = views @ views.mT if wide else views.mT @ views  # (N, min(b, d), min(b, d))
        s_high, q_high = _singular_values(high_gram.double(), None, need_grad)
        # Near R = b (orthogonal images) L_high moves like sqrt(b - R), which would magnify
        # float32 rounding of R: float64 there too.
        near_orthogonal = bool((s_high.sum(-1) > (1 - _NEAR_ORTHOGONAL) * views.shape[1]).any())
        if views.dtype != torch.float64 and (near_orthogonal or not _well_conditioned(s_high)):
            views = images64.transpose(0, 1)
            high_gram = views @ views.mT if wide else views.mT @ views
            s_high, q_high = _singular_values(high_gram, None, need_grad)

        ctx.local, ctx.wide = local, wide
        ctx.save_for_backward(z_all, views, contrast, q_low, s_low, q_high, s_high)
        return s_low.sum(-1), s_high.sum(-1)

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_low: torch.Tensor, grad_high: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        z_all, views, contrast, q_low, s_low, q_high, s_high = ctx.saved_tensors
        w_high = _inverse_root(q_high, s_high, grad_high).to(views.dtype)
        factors = (w_high, views) if ctx.wide else (views, w_high)
        grad = torch.empty_like(z_all, memory_format=torch.contiguous_format)
        if views.dtype == grad.dtype:  # straight into the (b, N, d) layout: no copy
            torch.bmm(*factors, out=grad.transpose(0, 1))
        else:
            grad.copy_(torch.bmm(*factors).transpose(0, 1))
        # d||H Z||_* / dZ = H^T U V^T = (H^T W H) Z: an N x N matrix per image, applied in
        # place; its entries are 1/s, so float32 keeps it to ~eps32/s relative.
        w_low = contrast.mT @ _inverse_root(q_low, s_low, grad_low) @ contrast
        grad[ctx.local].baddbmm_(w_low.to(z_all.dtype), z_all[ctx.local])
        return grad, None, None


def helmert_contrast(n: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``(n-1) x n`` Helmert contrast: orthonormal rows, each orthogonal to all-ones.

    Row ``k`` (1-based) is ``(1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))`` with ``k`` ones.
    """
    k = torch.arange(1, n, dtype=dtype, device=device)[:, None]
    j = torch.arange(n, dtype=dtype, device=device)[None, :]
    rows = torch.where(j < k, 1.0, torch.where(j == k, -k, 0.0))
    return rows / torch.sqrt(k * (k + 1))


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces (sums) and keeps the local slice.

    Summing is right under DDP: every process computes the same gathered term, and DDP's mean
    of parameter gradients then equals the gradient of the single-process, whole-batch loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.start, ctx.stop = dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0]
        return torch.cat(parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop]


def _check_hyperparameters(lambda_: float, gamma: float) -> None:
    if not (math.isfinite(lambda_) and lambda_ >= 0):
        raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")


def _check_shape(z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 3:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a (B, N, d) tensor of embeddings, got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"z must be floating point, got {z.dtype}")
    b, n, d = z.shape
    if n < 2:
        raise ValueError(f"z must hold N >= 2 views per image, got N = {n}")
    if b < 1 or d < 1:
        raise ValueError(f"z must hold at least one image and one feature, got shape {(b, n, d)}")


def _check_row_norms(sq_norms: torch.Tensor, z: torch.Tensor) -> None:
    """Raise unless every row of ``z`` is finite and unit-norm, given its squared row norms."""
    worst = (sq_norms.sqrt() - 1).abs().max().item()
    if worst <= _UNIT_NORM_TOL:
        return
    if not torch.isfinite(z).all():
        raise ValueError("z contains non-finite values (NaN or inf)")
    raise ValueError(
        f"the rows of z must be L2-normalised (largest |norm - 1| is {worst:.3g}); "
        "apply torch.nn.functional.normalize(z, dim=-1) first"
    )


def _warn_once_more_images_than_dims(b: int, d: int) -> None:
    global _warned_more_images_than_dims
    if not _warned_more_images_than_dims:
        _warned_more_images_than_dims = True
        warnings.warn(
            f"SSOLE loss: {b} images exceed the embedding dimension d = {d}, so the images cannot "
            "be mutually orthogonal and loss_high cannot reach 0; use fewer images or a larger d",
            UserWarning,
            stacklevel=3,
        )


def _check_variant(objective: str, centering: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(
            f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}"
        )
    if centering not in LOW_RANK_CENTERINGS:
        raise ValueError(
            f"centering must be one of {', '.join(map(repr, LOW_RANK_CENTERINGS))}, "
            f"got {centering!r}"
        )


def _ssole_parts(
    z_all: torch.Tensor, local: slice, lambda_: float, gamma: float, centering: str
) -> tuple[torch.Tensor, ...]:
    """SSOLE's ``(loss, loss_low, loss_high, rank_low, rank_high)`` of the gathered ``z_all``
    ``(b, N, d)``; the low-rank term over the images in ``local``."""
    b, n_views = z_all.shape[:2]
    if centering == "mean":
        contrast = helmert_contrast(n_views, dtype=torch.float64, device=z_all.device)
    else:  # the raw views: the identity "contrast" makes the low-rank Gram Z_i Z_i^T itself
        contrast = torch.eye(n_views, dtype=torch.float64, device=z_all.device)
    r, big_r = _SSOLENuclearNorms.apply(z_all, local, contrast)  # (B,), (N,)

    loss_low = r.square().mean() / (n_views - 1) ** 2
    # Unit rows give sqrt(b) <= R <= b; the clamp keeps arcsin and its gradient finite when
    # rounding reaches the orthogonal end.
    ratio = (big_r / b).clamp(max=1 - 1e-15)
    beta = torch.asin(ratio) - math.asin(1 / math.sqrt(b))
    c2 = (b * torch.cos(beta).square() - 1) / (b - 1)
    c1 = (b**2 / big_r.square() - 1) / (b - 1)
    loss_high = (gamma * c1 + (1 - gamma) * c2).mean()

    loss = loss_low + lambda_ * loss_high
    return loss, loss_low, loss_high, r.mean(), big_r.mean()


def _coupled_ole_parts(
    z_all: torch.Tensor, local: slice, lambda_: float
) -> tuple[torch.Tensor, ...]:
    """The coupled OLE objective's ``(loss, loss_low, loss_high, rank_low, rank_high)`` of the
    gathered ``z_all`` ``(b, N, d)``; the low-rank term over the images in ``local``."""
    b, n_views, dim = z_all.shape
    _check_row_norms(z_all.detach().to(torch.float64).square().sum(-1), z_all)
    r = nuclear_norm(z_all[local])  # (B,): each image's N x d views, via its N x N Gram
    # All b N views in one matrix, via the smaller of its (b N) x (b N) and d x d Grams.
    big_r = nuclear_norm(z_all.reshape(b * n_views, dim))
    loss_low = r.mean() / n_views
    loss_high = big_r / (b * n_views)
    loss = loss_low - lambda_ * loss_high
    return loss, loss_low, loss_high, r.mean(), big_r


def ssole_loss(
    z: torch.Tensor,
    lambda_: float = 0.6,
    gamma: float = 0.5,
    gather: bool = False,
    *,
    objective: str = "ssole",
    centering: str = "mean",
) -> SSOLELossParts:
    """The SSOLE loss of multi-view embeddings, with its parts.

    See :class:`SSOLELoss` for the math. Runs in float32 (float64 if ``z`` is float64) with
    autocast disabled; the small eigenproblems run in float64.

    Args:
        z: ``(B, N, d)`` embeddings, B images x N views, every row L2-normalised.
        lambda_: weight of the high-rank term.
        gamma: mix of the two high-rank penalties (0.5 in the paper; SSOLE only).
        gather: under an initialised ``torch.distributed``, compute the high-rank term over all
            processes' images (every process must pass the same B); a no-op otherwise.
        objective: ``"ssole"`` (the paper's loss) or ``"coupled_ole"`` (the OLE loss it starts
            from; see :class:`SSOLELoss`).
        centering: SSOLE's low-rank term on the views minus their mean (``"mean"``, the
            paper's) or on the raw views (``"none"``). ``coupled_ole`` always takes raw views.

    Returns:
        :class:`SSOLELossParts` ``(loss, loss_low, loss_high, rank_low, rank_high)``.

    Raises:
        ValueError: if ``z`` is not a floating-point ``(B, N, d)`` tensor, ``N < 2``, fewer than
            2 images in total, ``z`` holds NaN or inf or rows that are not unit-norm, or a
            hyper-parameter, ``objective`` or ``centering`` is out of range.
    """
    _check_hyperparameters(lambda_, gamma)
    _check_variant(objective, centering)
    _check_shape(z)
    gather = gather and dist.is_available() and dist.is_initialized()
    n_img, _, dim = z.shape
    b = n_img * (dist.get_world_size() if gather else 1)
    if b < 2:
        raise ValueError(f"the high-rank term needs at least 2 images in total, got {b}")
    if b > dim and objective == "ssole":
        _warn_once_more_images_than_dims(b, dim)

    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    # SVD and eigh have no half-precision kernels, and the Gram matrices need the range anyway.
    with torch.autocast(z.device.type, enabled=False):
        z = z.to(dtype)
        if gather:
            # The input check runs on the gathered batch, so every process raises together
            # instead of leaving the others waiting in a collective.
            local = slice(dist.get_rank() * n_img, (dist.get_rank() + 1) * n_img)
            z_all = _AllGather.apply(z)
        else:
            local, z_all = slice(None), z
        if objective == "coupled_ole":
            parts = _coupled_ole_parts(z_all, local, lambda_)
        else:
            parts = _ssole_parts(z_all, local, lambda_, gamma, centering)
        return SSOLELossParts(*(p.to(dtype) for p in parts))


class SSOLELoss(nn.Module):
    """SSOLE: Self-Supervised Orthogonal Low-rank Embedding (Huang, Qiu & Sapiro, ICLR 2025).

    "SSOLE: Rethinking Orthogonal Low-rank Embedding for Self-Supervised Learning", ICLR 2025.
    Pulls the N views of each image into a nearly
    rank-one set and pushes different images towards mutually orthogonal directions, with no
    large batch, memory bank, momentum encoder or predictor.

    With ``||.||_*`` the nuclear norm, ``Z_i`` the ``N x d`` views of image i (mean ``m_i``,
    treated as a constant) and ``M_v`` the ``b x d`` matrix of view v across all b images::

        r_i    = || Z_i - 1 m_i^T ||_*                 L_low  = mean_i r_i^2 / (N - 1)^2
        R_v    = || M_v ||_*                           (sqrt(b) <= R_v <= b for unit rows)
        beta_v = arcsin(R_v / b) - arcsin(1 / sqrt(b))
        c1_v   = (b^2 / R_v^2 - 1) / (b - 1)           c2_v = (b cos(beta_v)^2 - 1) / (b - 1)
        L_high = mean_v [gamma c1_v + (1 - gamma) c2_v]
        L      = L_low + lambda_ L_high

    ``L_high`` reads as a mean squared cosine between different images: 1 when all images
    collapse onto one direction, 0 when they are mutually orthogonal (which needs b <= d; with
    more images than dimensions the loss warns once). Nuclear norms are computed exactly, via
    float64 eigenproblems of Helmert-contrasted and Gram matrices, with the exact gradient.

    Two variants, each one switch, test the paper's claims:

    ``centering="none"``: the low-rank term on the raw views instead of their deviations from
    the mean, ``r_i = ||Z_i||_*`` (from the ``N x N`` Gram ``Z_i Z_i^T``), with the same
    ``(N - 1)^2`` normalisation and everything else as above. Unit rows give
    ``r_i >= sqrt(N)``, so ``L_low >= N / (N - 1)^2`` (reached when all N views agree).

    ``objective="coupled_ole"``: the OLE loss the paper starts from (Lezama, Qiu, Musé &
    Sapiro, "OLÉ: Orthogonal Low-rank Embedding, a plug and play geometric loss for deep
    learning", CVPR 2018), ``sum_c max(delta, ||Y_c||_*) - ||Y||_*`` over classes c, with each
    image's N views as a class and both terms on the same raw embeddings (so they are
    coupled: every view is in its image's matrix and in the matrix of all views)::

        L = mean_i ||Z_i||_* / N  -  lambda_ ||Z_all||_* / (b N)

    where ``Z_all`` is the ``(b N) x d`` matrix of all views of all b (gathered) images. Sums
    become means, normalised by N and b N so that both terms lie in (0, 1] for unit rows
    (``||Z_i||_* / N >= 1 / sqrt(N)``, ``||Z_all||_* / (b N) >= 1 / sqrt(b N)``); OLE's
    threshold ``delta`` is dropped, since unit rows already keep ``||Z_i||_* >= sqrt(N)``.
    ``gamma`` and ``centering`` play no part. Collapse gives ``1/sqrt(N) - lambda_/sqrt(b N)``;
    mutually orthogonal views (``b N <= d``) give ``1 - lambda_``.

    Args:
        lambda_: weight of the high-rank term (0.6 in the released ImageNet-100 recipe).
        gamma: mix of the two high-rank penalties ``c1`` and ``c2`` (0.5 in the paper).
        gather: under ``torch.distributed``, compute the high-rank term over every process's
            images, so that ``b = B x world_size``; gradients reach each process's own slice.
            Every process must pass the same B. A no-op when distributed is not initialised.
        objective: ``"ssole"`` (default) or ``"coupled_ole"`` (above).
        centering: ``"mean"`` (default, the paper's) or ``"none"`` (above); SSOLE only.

    Shapes:
        - input ``z``: ``(B, N, d)``: B images, N >= 2 views each, rows L2-normalised.
        - output: a 0-d tensor (float32, or float64 for float64 input).

    Raises:
        ValueError: in ``__init__`` for a negative or non-finite ``lambda_``, ``gamma``
            outside [0, 1], or an unknown ``objective`` or ``centering``; in ``forward`` for
            input that :func:`ssole_loss` rejects.

    Examples:
        >>> import torch.nn.functional as F
        >>> loss_fn = SSOLELoss(lambda_=0.6)
        >>> # z = F.normalize(encoder(views), dim=-1) for views (B, N, C, H, W); here random:
        >>> z = F.normalize(torch.randn(32, 4, 128), dim=-1).requires_grad_()
        >>> loss = loss_fn(z)
        >>> loss.backward()

    Use :func:`ssole_loss` to get the parts (``loss_low``, ``loss_high``, ``rank_low``,
    ``rank_high``) for logging.
    """

    def __init__(
        self,
        lambda_: float = 0.6,
        gamma: float = 0.5,
        gather: bool = False,
        *,
        objective: str = "ssole",
        centering: str = "mean",
    ) -> None:
        super().__init__()
        _check_hyperparameters(lambda_, gamma)
        _check_variant(objective, centering)
        self.lambda_ = lambda_
        self.gamma = gamma
        self.gather = gather
        self.objective = objective
        self.centering = centering

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Return the scalar SSOLE loss of ``z`` ``(B, N, d)``."""
        return ssole_loss(
            z,
            self.lambda_,
            self.gamma,
            self.gather,
            objective=self.objective,
            centering=self.centering,
        ).loss

    def extra_repr(self) -> str:
        return (
            f"lambda_={self.lambda_}, gamma={self.gamma}, gather={self.gather}, "
            f"objective={self.objective!r}, centering={self.centering!r}"
        )
