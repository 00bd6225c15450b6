"""The SSOLE loss against a float64 SVD of the same matrices, on random and structured inputs.

The reference forms the centred views explicitly (no Helmert contrast) and takes singular values
and vectors from ``torch.linalg.svd`` in float64; its gradient is ``U V^T`` over the singular
values above 1e-10 of the largest, chained through the loss formula by autograd.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import ssole_hub.loss as loss_module
from ssole_hub import SSOLELoss, SSOLELossParts, nuclear_norm, ssole_loss


def _polar(x: torch.Tensor) -> torch.Tensor:
    """``U V^T`` over singular values above 1e-10 of the largest (float64)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = s > 1e-10 * s[..., :1]
    return (u * keep[..., None, :]) @ vh


def reference(z: torch.Tensor, lambda_: float = 0.6, gamma: float = 0.5):
    """Loss parts and ``d loss / d z`` from float64 SVDs of the centred views and of each view."""
    z = z.double()
    b, n, _ = z.shape
    centred = z - z.mean(1, keepdim=True)
    views = z.transpose(0, 1)
    r = torch.linalg.svdvals(centred).sum(-1).requires_grad_()
    big_r = torch.linalg.svdvals(views).sum(-1).requires_grad_()
    loss_low = (r**2).mean() / (n - 1) ** 2
    ratio = (big_r / b).clamp(max=1)
    beta = torch.asin(ratio) - math.asin(1 / math.sqrt(b))
    c2 = (b * torch.cos(beta) ** 2 - 1) / (b - 1)
    c1 = (b**2 / big_r**2 - 1) / (b - 1)
    loss_high = (gamma * c1 + (1 - gamma) * c2).mean()
    loss = loss_low + lambda_ * loss_high
    grad_r, grad_big_r = torch.autograd.grad(loss, (r, big_r))
    grad = grad_r[:, None, None] * _polar(centred)
    grad = grad + (grad_big_r[:, None, None] * _polar(views)).transpose(0, 1)
    parts = SSOLELossParts(loss, loss_low, loss_high, r.mean(), big_r.mean())
    return SSOLELossParts(*(p.detach() for p in parts)), grad


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def make_embeddings(kind: str, b: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Unit-norm float64 embeddings ``(b, n, d)`` of a named structure."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "random":
        return _unit(randn(b, n, d))
    if kind == "collapsed":  # every view of every image is the same vector
        return _unit(randn(1, 1, d)).expand(b, n, d).clone()
    if kind == "near_collapsed":  # views and images within ~1e-3 of one direction
        return _unit(randn(1, 1, d) + 1e-3 * randn(b, n, d))
    if kind == "clustered":  # 3 tight clusters of images, views close to their image
        centres = _unit(randn(3, 1, d))
        images = centres[torch.arange(b) % 3] + 1e-2 * randn(b, 1, d)
        return _unit(images + 1e-2 * randn(b, n, d))
    if kind == "orthogonal":  # all b*n rows mutually orthogonal (needs b*n <= d)
        q, _ = torch.linalg.qr(randn(d, b * n))
        return q.T.reshape(b, n, d).contiguous()
    if kind == "rank_deficient":  # images repeated in pairs, views repeated in pairs
        half = _unit(randn((b + 1) // 2, (n + 1) // 2, d))
        return half.repeat_interleave(2, 0)[:b].repeat_interleave(2, 1)[:, :n].contiguous()
    raise ValueError(kind)


# (kind, B, N, d): N = 2..8, b < d and b > d.
CASES = [
    ("random", 16, 4, 32),
    ("random", 6, 2, 40),
    ("random", 12, 8, 64),
    ("random", 24, 3, 8),  # b > d
    ("collapsed", 10, 4, 16),
    ("near_collapsed", 16, 4, 32),
    ("near_collapsed", 12, 5, 6),  # b > d
    ("clustered", 15, 6, 24),
    ("orthogonal", 5, 4, 24),
    ("rank_deficient", 10, 6, 16),
    ("rank_deficient", 9, 7, 5),  # b > d
]
CASE_IDS = [f"{k}-B{b}-N{n}-d{d}" for k, b, n, d in CASES]


@pytest.fixture(autouse=True)
def _quiet_more_images_than_dims():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SSOLE loss: .* exceed the embedding")
        yield


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def _assert_parts_close(parts, ref, rtol: float, atol: float) -> None:
    for name, a, e in zip(SSOLELossParts._fields, parts, ref, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(("kind", "b", "n", "d"), CASES, ids=CASE_IDS)
def test_float64_value_and_gradient_match_svd_reference(kind, b, n, d):
    z = make_embeddings(kind, b, n, d).requires_grad_()
    parts = ssole_loss(z)
    parts.loss.backward()
    ref, ref_grad = reference(z.detach())
    assert all(p.dtype == torch.float64 for p in parts)
    # The centred views' Gram carries the rounding of the uncentred one (eps / spread^2, ~1e-10
    # for views 1e-3 apart); the orthogonal end R = b is clamped just inside arcsin's domain.
    for name, a, e in zip(SSOLELossParts._fields, parts, ref, strict=True):
        near = kind == "near_collapsed" and name in ("loss_low", "rank_low")
        atol = 1e-7 if kind == "orthogonal" else 1e-13
        torch.testing.assert_close(a, e, rtol=1e-9 if near else 1e-11, atol=atol, msg=name)
    if kind != "orthogonal":  # the exact gradient is infinite at R = b
        # Gram eigenvectors carry eps * cond^2 rounding: ~1e-9 when views are 1e-3 apart.
        assert _rel_err(z.grad, ref_grad) < 1e-7


@pytest.mark.parametrize(("kind", "b", "n", "d"), CASES, ids=CASE_IDS)
def test_float32_value_within_1e_5_and_gradient_within_1e_3(kind, b, n, d):
    z = make_embeddings(kind, b, n, d).float().requires_grad_()
    parts = ssole_loss(z)
    parts.loss.backward()
    ref, ref_grad = reference(z.detach())
    assert all(p.dtype == torch.float32 for p in parts)
    assert z.grad.dtype == torch.float32
    _assert_parts_close(parts, ref, rtol=1e-5, atol=1e-6)
    if kind != "orthogonal":
        assert _rel_err(z.grad, ref_grad) < 1e-3


@pytest.mark.parametrize("kind", ["random", "near_collapsed", "clustered"])
def test_large_float32_batch_stays_exact(kind):
    """b = 256, d = 1024: well-conditioned views take float32 products, ill-conditioned ones
    (views within 1e-3 of one direction, where a float32 Gram matrix would be ~1e-3 off) take
    float64; both must match the reference."""
    z = make_embeddings(kind, 256, 4, 1024, seed=3).float().requires_grad_()
    parts = ssole_loss(z)
    parts.loss.backward()
    ref, ref_grad = reference(z.detach())
    _assert_parts_close(parts, ref, rtol=1e-5, atol=1e-6)
    assert _rel_err(z.grad, ref_grad) < 1e-3


@pytest.mark.parametrize(("b", "n", "d"), [(4, 3, 6), (5, 2, 3), (3, 4, 4)])
def test_gradcheck_passes_in_float64(b, n, d):
    z = make_embeddings("random", b, n, d, seed=b).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ssole_loss(x).loss, (z,))


def test_collapse_gives_loss_high_one_and_rank_high_sqrt_b():
    z = make_embeddings("collapsed", 12, 4, 32).float()
    parts = ssole_loss(z)
    assert parts.loss_high.item() == pytest.approx(1.0, abs=1e-6)
    assert parts.rank_high.item() == pytest.approx(math.sqrt(12), rel=1e-6)
    assert parts.loss_low.item() == 0.0


def test_orthogonal_images_give_loss_high_zero_and_rank_high_b():
    # Float64: near R = b, loss_high grows like sqrt(b - R), so float32 rounding of the input
    # alone moves it by ~1e-5.
    z = make_embeddings("orthogonal", 6, 3, 32)
    parts = ssole_loss(z)
    assert parts.loss_high.item() == pytest.approx(0.0, abs=1e-7)
    assert parts.rank_high.item() == pytest.approx(6.0, rel=1e-6)
    # Orthonormal views: the centred views have N-1 unit singular values.
    assert parts.rank_low.item() == pytest.approx(2.0, rel=1e-6)


def test_identical_views_give_loss_low_exactly_zero_and_no_low_rank_gradient():
    z = _unit(torch.randn(8, 1, 16)).expand(8, 5, 16).clone().requires_grad_()
    parts = ssole_loss(z)
    assert parts.loss_low.item() == 0.0
    assert parts.rank_low.item() == 0.0
    parts.loss_low.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_low_rank_gradient_sums_to_zero_over_the_views_of_each_image():
    """The exact gradient lies in the centred space; a generic SVD backward adds an arbitrary
    ``u v^T`` for the centred matrix's zero singular value instead."""
    z = _unit(torch.randn(6, 4, 32, dtype=torch.float64)).requires_grad_()
    ssole_loss(z).loss_low.backward()
    assert z.grad.abs().max() > 1e-3
    torch.testing.assert_close(z.grad.sum(1), torch.zeros(6, 32, dtype=torch.float64))


def test_loss_is_invariant_to_the_order_of_images_and_of_views():
    z = _unit(torch.randn(10, 4, 32))
    base = ssole_loss(z)
    shuffled = ssole_loss(z[torch.randperm(10)][:, torch.randperm(4)])
    _assert_parts_close(shuffled, tuple(p.double() for p in base), rtol=1e-5, atol=1e-6)


def test_lambda_and_gamma_weight_the_parts_as_documented():
    z = _unit(torch.randn(10, 4, 32, dtype=torch.float64))
    no_high = ssole_loss(z, lambda_=0.0)
    assert no_high.loss.item() == pytest.approx(no_high.loss_low.item(), rel=1e-12)
    c1_only = ssole_loss(z, lambda_=2.0, gamma=1.0)
    per_view = torch.linalg.svdvals(z.transpose(0, 1)).sum(-1)
    c1 = ((10**2 / per_view**2 - 1) / (10 - 1)).mean()
    assert c1_only.loss_high.item() == pytest.approx(c1.item(), rel=1e-12)
    assert c1_only.loss.item() == pytest.approx(
        c1_only.loss_low.item() + 2.0 * c1.item(), rel=1e-12
    )
    assert c1_only.rank_high.item() == pytest.approx(per_view.mean().item(), rel=1e-12)


def test_half_precision_input_under_autocast_runs_in_float32():
    z = _unit(torch.randn(8, 4, 32)).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = ssole_loss(z)
    assert parts.loss.dtype == torch.float32
    expected = ssole_loss(z.detach().float()).loss
    assert parts.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    parts.loss.backward()
    assert z.grad.dtype == torch.bfloat16
    assert torch.isfinite(z.grad.float()).all()


def test_module_forward_returns_the_scalar_loss():
    z = _unit(torch.randn(8, 4, 32))
    module = SSOLELoss(lambda_=0.3, gamma=0.7)
    out = module(z)
    assert out.ndim == 0
    assert out.item() == pytest.approx(ssole_loss(z, 0.3, 0.7).loss.item(), rel=1e-6)
    assert "lambda_=0.3" in repr(module)


def test_gather_without_initialised_distributed_is_a_no_op():
    z = _unit(torch.randn(8, 4, 32))
    assert ssole_loss(z, gather=True).loss.item() == ssole_loss(z).loss.item()


def test_parts_convert_to_a_dict_of_logged_values():
    parts = ssole_loss(_unit(torch.randn(4, 2, 16)))._asdict()
    assert list(parts) == ["loss", "loss_low", "loss_high", "rank_low", "rank_high"]


@pytest.mark.parametrize(
    ("z", "match"),
    [
        (torch.ones(4, 16), r"\(B, N, d\)"),
        (torch.ones(2, 4, 2, 16), r"\(B, N, d\)"),
        (_unit(torch.randn(8, 1, 16)), "N >= 2"),
        (_unit(torch.randn(1, 4, 16)), "at least 2 images"),
        (_unit(torch.randn(4, 3, 0)), "at least one image and one feature"),
        (torch.ones(4, 3, 16, dtype=torch.int64), "floating point"),
        (torch.randn(4, 3, 16), "L2-normalised"),
        (torch.zeros(4, 3, 16), "L2-normalised"),
    ],
    ids=["2d", "4d", "one_view", "one_image", "no_features", "integer", "not_unit", "zeros"],
)
def test_bad_input_raises_value_error_naming_the_problem(z, match):
    with pytest.raises(ValueError, match=match):
        ssole_loss(z)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings_raise_value_error(bad):
    z = _unit(torch.randn(4, 3, 16))
    z[2, 1, 5] = bad
    with pytest.raises(ValueError, match="non-finite"):
        ssole_loss(z)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lambda_": -0.1}, "lambda_"),
        ({"lambda_": float("nan")}, "lambda_"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": -0.01}, "gamma"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSOLELoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        ssole_loss(_unit(torch.randn(4, 2, 8)), **kwargs)


def test_more_images_than_dimensions_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(loss_module, "_warned_more_images_than_dims", False)
    z = _unit(torch.randn(12, 2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ssole_loss(z)
        ssole_loss(z)
        ssole_loss(_unit(torch.randn(4, 2, 8)))  # b <= d: never warns
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "12 images exceed the embedding dimension d = 8" in messages[0]


# --- nuclear_norm ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 30), (30, 7), (3, 5, 9), (2, 3, 9, 4), (6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nuclear_norm_matches_svd(shape, dtype):
    x = torch.randn(*shape, dtype=torch.float64)
    out = nuclear_norm(x.to(dtype))
    assert out.dtype == dtype
    assert out.shape == shape[:-2]
    expected = torch.linalg.svdvals(x.to(dtype).double()).sum(-1)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (2, 3, 5)])
def test_nuclear_norm_gradcheck_passes(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(nuclear_norm, (x,))


def test_nuclear_norm_gradient_of_rank_deficient_matrix_is_u_vt_over_nonzero_singular_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 9, generator=g, dtype=torch.float64
    )  # rank 2
    x.requires_grad_()
    nuclear_norm(x).backward()
    torch.testing.assert_close(x.grad, _polar(x.detach()), rtol=1e-9, atol=1e-9)
    assert torch.linalg.matrix_rank(x.grad).item() == 2


def test_nuclear_norm_of_zero_matrix_is_zero_with_zero_gradient():
    x = torch.zeros(3, 4, 5, requires_grad=True)
    out = nuclear_norm(x)
    out.sum().backward()
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.ones(5), r"\(\.\.\., k, n\)"),
        (torch.ones(3, 3, dtype=torch.int32), "floating point"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "non-finite"),
    ],
)
def test_nuclear_norm_bad_input_raises_value_error(x, match):
    with pytest.raises(ValueError, match=match):
        nuclear_norm(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_under_bfloat16_autocast():
    z = make_embeddings("clustered", 32, 4, 256).float()
    cpu = ssole_loss(z.clone().requires_grad_())
    zc = z.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = ssole_loss(zc)
    gpu.loss.backward()
    _assert_parts_close([p.cpu() for p in gpu], [p.double() for p in cpu], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(zc.grad).all()


# --- the variants: SSOLE on raw views, and the coupled OLE objective --------------------------


def reference_uncentred(z: torch.Tensor, lambda_: float = 0.6, gamma: float = 0.5):
    """As :func:`reference`, with the low-rank term on the raw views ``r_i = ||Z_i||_*``."""
    z = z.double()
    b, n, _ = z.shape
    views = z.transpose(0, 1)
    r = torch.linalg.svdvals(z).sum(-1).requires_grad_()
    big_r = torch.linalg.svdvals(views).sum(-1).requires_grad_()
    loss_low = (r**2).mean() / (n - 1) ** 2
    beta = torch.asin((big_r / b).clamp(max=1)) - math.asin(1 / math.sqrt(b))
    c2 = (b * torch.cos(beta) ** 2 - 1) / (b - 1)
    c1 = (b**2 / big_r**2 - 1) / (b - 1)
    loss_high = (gamma * c1 + (1 - gamma) * c2).mean()
    loss = loss_low + lambda_ * loss_high
    grad_r, grad_big_r = torch.autograd.grad(loss, (r, big_r))
    grad = grad_r[:, None, None] * _polar(z)
    grad = grad + (grad_big_r[:, None, None] * _polar(views)).transpose(0, 1)
    parts = SSOLELossParts(loss, loss_low, loss_high, r.mean(), big_r.mean())
    return SSOLELossParts(*(p.detach() for p in parts)), grad


def reference_coupled_ole(z: torch.Tensor, lambda_: float = 0.6):
    """``mean_i ||Z_i||_* / N - lambda ||Z_all||_* / (b N)`` and its gradient, from float64
    SVDs of each image's raw views and of all ``b N`` views in one matrix."""
    z = z.double()
    b, n, d = z.shape
    everything = z.reshape(b * n, d)
    r = torch.linalg.svdvals(z).sum(-1).requires_grad_()
    big_r = torch.linalg.svdvals(everything).sum().requires_grad_()
    loss_low = r.mean() / n
    loss_high = big_r / (b * n)
    loss = loss_low - lambda_ * loss_high
    grad_r, grad_big_r = torch.autograd.grad(loss, (r, big_r))
    grad = grad_r[:, None, None] * _polar(z) + grad_big_r * _polar(everything).reshape(b, n, d)
    parts = SSOLELossParts(loss, loss_low, loss_high, r.mean(), big_r)
    return SSOLELossParts(*(p.detach() for p in parts)), grad


VARIANTS = {
    "raw_views": ({"centering": "none"}, reference_uncentred),
    "coupled_ole": ({"objective": "coupled_ole"}, reference_coupled_ole),
}
# Every structure, N = 2..8, b < d and b > d (b N > d for the coupled all-views matrix).
VARIANT_CASES = [c for c in CASES if c[0] != "orthogonal"] + [("orthogonal", 3, 4, 24)]
VARIANT_CASE_IDS = [f"{k}-B{b}-N{n}-d{d}" for k, b, n, d in VARIANT_CASES]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("kind", "b", "n", "d"), VARIANT_CASES, ids=VARIANT_CASE_IDS)
def test_variant_float64_value_and_gradient_match_its_svd_reference(variant, kind, b, n, d):
    kwargs, ref_fn = VARIANTS[variant]
    z = make_embeddings(kind, b, n, d).requires_grad_()
    parts = ssole_loss(z, **kwargs)
    parts.loss.backward()
    ref, ref_grad = ref_fn(z.detach())
    assert all(p.dtype == torch.float64 for p in parts)
    # The orthogonal end of SSOLE's arcsin is clamped just inside its domain (as above).
    atol = 1e-7 if kind == "orthogonal" and variant == "raw_views" else 1e-13
    for name, a, e in zip(SSOLELossParts._fields, parts, ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=atol, msg=name)
    if not (kind == "orthogonal" and variant == "raw_views"):  # infinite at R = b
        assert _rel_err(z.grad, ref_grad) < 1e-7


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("kind", "b", "n", "d"), VARIANT_CASES, ids=VARIANT_CASE_IDS)
def test_variant_float32_value_within_1e_5_and_gradient_within_1e_3(variant, kind, b, n, d):
    kwargs, ref_fn = VARIANTS[variant]
    z = make_embeddings(kind, b, n, d).float().requires_grad_()
    parts = ssole_loss(z, **kwargs)
    parts.loss.backward()
    ref, ref_grad = ref_fn(z.detach())
    assert all(p.dtype == torch.float32 for p in parts) and z.grad.dtype == torch.float32
    _assert_parts_close(parts, ref, rtol=1e-5, atol=1e-6)
    if not (kind == "orthogonal" and variant == "raw_views"):
        assert _rel_err(z.grad, ref_grad) < 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("b", "n", "d"), [(4, 3, 6), (5, 2, 3), (3, 4, 4)])
def test_variant_gradcheck_passes_in_float64(variant, b, n, d):
    kwargs, _ = VARIANTS[variant]
    z = make_embeddings("random", b, n, d, seed=b).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ssole_loss(x, **kwargs).loss, (z,))


def test_variants_differ_from_ssole_and_from_each_other():
    z = make_embeddings("random", 8, 4, 32)
    losses = {
        name: ssole_loss(z, **kwargs).loss.item()
        for name, kwargs in [
            ("ssole", {}),
            ("explicit_defaults", {"objective": "ssole", "centering": "mean"}),
            *((name, kw) for name, (kw, _) in VARIANTS.items()),
        ]
    }
    assert losses["explicit_defaults"] == losses["ssole"]
    assert len({losses["ssole"], losses["raw_views"], losses["coupled_ole"]}) == 3


def test_raw_views_low_rank_term_is_sqrt_n_for_identical_views():
    """Identical views: centred, ``r_i = 0``; raw, ``r_i = sqrt(N)``, ``L_low = N / (N-1)^2``."""
    n = 5
    z = _unit(torch.randn(8, 1, 16, dtype=torch.float64)).expand(8, n, 16).clone()
    parts = ssole_loss(z, centering="none")
    assert parts.rank_low.item() == pytest.approx(math.sqrt(n), rel=1e-12)
    assert parts.loss_low.item() == pytest.approx(n / (n - 1) ** 2, rel=1e-12)
    # The high-rank term is SSOLE's own.
    assert parts.loss_high.item() == pytest.approx(ssole_loss(z).loss_high.item(), rel=1e-12)


def test_raw_views_gradient_leaves_the_centred_space():
    """Unlike SSOLE's, the raw low-rank gradient also moves the views' mean."""
    z = _unit(torch.randn(6, 4, 32, dtype=torch.float64)).requires_grad_()
    ssole_loss(z, centering="none").loss_low.backward()
    assert z.grad.sum(1).abs().max() > 1e-3


def test_coupled_ole_collapse_and_orthogonal_ends():
    b, n, lam = 3, 4, 0.6
    collapsed = ssole_loss(make_embeddings("collapsed", b, n, 16), lam, objective="coupled_ole")
    assert collapsed.loss_low.item() == pytest.approx(1 / math.sqrt(n), rel=1e-12)
    assert collapsed.loss_high.item() == pytest.approx(1 / math.sqrt(b * n), rel=1e-12)
    assert collapsed.loss.item() == pytest.approx(
        1 / math.sqrt(n) - lam / math.sqrt(b * n), rel=1e-12
    )
    orthogonal = ssole_loss(make_embeddings("orthogonal", b, n, 24), lam, objective="coupled_ole")
    assert orthogonal.loss_low.item() == pytest.approx(1.0, rel=1e-12)
    assert orthogonal.loss_high.item() == pytest.approx(1.0, rel=1e-12)
    assert orthogonal.rank_high.item() == pytest.approx(b * n, rel=1e-12)
    assert orthogonal.loss.item() == pytest.approx(1 - lam, rel=1e-12)


def test_coupled_ole_ignores_gamma_and_centering_and_does_not_warn(monkeypatch):
    monkeypatch.setattr(loss_module, "_warned_more_images_than_dims", False)
    z = _unit(torch.randn(12, 2, 8, dtype=torch.float64))  # b > d
    base = ssole_loss(z, objective="coupled_ole").loss.item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = ssole_loss(z, gamma=0.1, objective="coupled_ole", centering="none")
    assert other.loss.item() == base


def test_variants_reject_rows_that_are_not_unit_norm():
    with pytest.raises(ValueError, match="L2-normalised"):
        ssole_loss(torch.randn(4, 3, 16), objective="coupled_ole")
    with pytest.raises(ValueError, match="L2-normalised"):
        ssole_loss(torch.randn(4, 3, 16), centering="none")
    z = _unit(torch.randn(4, 3, 16))
    z[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ssole_loss(z, objective="coupled_ole")


def test_module_passes_the_variant_on():
    z = _unit(torch.randn(8, 4, 32))
    module = SSOLELoss(lambda_=0.3, objective="coupled_ole")
    assert module(z).item() == pytest.approx(
        ssole_loss(z, 0.3, objective="coupled_ole").loss.item(), rel=1e-6
    )
    assert "objective='coupled_ole'" in repr(module) and "centering='mean'" in repr(module)
    raw = SSOLELoss(centering="none")
    assert raw(z).item() == pytest.approx(ssole_loss(z, centering="none").loss.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "ole"}, r"objective must be one of 'ssole', 'coupled_ole', got 'ole'"),
        ({"objective": "SSOLE"}, "objective must be one of"),
        ({"centering": "median"}, r"centering must be one of 'mean', 'none', got 'median'"),
        ({"centering": None}, "centering must be one of"),
    ],
)
def test_bad_variant_names_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSOLELoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        ssole_loss(_unit(torch.randn(4, 2, 8)), **kwargs)
