import pytest
import torch

from bitflux.ternary import absmean, dequantize, relative_error, ternarize, twn


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 96), (5, 1000)])
def test_codes_are_ternary_and_scales_positive(shape):
    w = torch.randn(shape)
    for method in ("absmean", "twn"):
        codes, scale = ternarize(w, method)
        assert codes.dtype == torch.int8 and codes.shape == w.shape
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        assert scale.shape == (shape[0],) and (scale > 0).all()


def test_absmean_matches_bitnet_definition():
    w = torch.randn(8, 33)
    codes, scale = absmean(w)
    assert torch.allclose(scale, w.abs().mean(1))
    assert torch.equal(codes, torch.round(w / scale[:, None]).clamp(-1, 1).to(torch.int8))


def _best_threshold_error(row: torch.Tensor) -> float:
    """Exhaustive search over k: keep the k largest |w| with the least-squares scale."""
    mag, order = row.abs().sort(descending=True)
    best = float("inf")
    for k in range(1, row.numel() + 1):
        t = torch.zeros_like(row)
        t[order[:k]] = torch.sign(row[order[:k]])
        s = mag[:k].sum() / k
        best = min(best, float((row - s * t).square().sum()))
    return best


def test_twn_is_the_per_row_optimum_of_the_threshold_rule():
    w = torch.randn(6, 40) * torch.rand(6, 1)
    codes, scale = twn(w, row_chunk=4)  # chunking must not change the result
    for r in range(w.shape[0]):
        err = float((w[r] - dequantize(codes[r : r + 1], scale[r : r + 1])[0]).square().sum())
        assert err == pytest.approx(_best_threshold_error(w[r]), rel=1e-4)


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
def test_twn_never_worse_than_absmean(dist):
    g = torch.Generator().manual_seed(0)
    if dist == "normal":
        w = torch.randn(128, 512, generator=g)
    elif dist == "uniform":
        w = torch.rand(128, 512, generator=g) * 2 - 1
    else:
        w = torch.distributions.Laplace(0.0, 1.0).sample((128, 512))
    e_abs = relative_error(w, *absmean(w))
    e_twn = relative_error(w, *twn(w))
    assert e_twn <= e_abs + 1e-6
    # Gaussian reference points: the optimal ternary code leaves ~43.5 % relative error.
    if dist == "normal":
        assert 0.41 < e_twn < 0.46 and 0.49 < e_abs < 0.54


def test_zero_rows_do_not_produce_nan():
    w = torch.zeros(2, 8)
    for method in ("absmean", "twn"):
        codes, scale = ternarize(w, method)
        assert torch.isfinite(scale).all()
        assert torch.isfinite(dequantize(codes, scale)).all()
