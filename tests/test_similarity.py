"""Cross-layer similarity metrics: unit tests on random tensors, one streaming check on the embedded model."""
from __future__ import annotations

import math

import pytest
import torch

from crosskv.core import similarity as sim


def _orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _centered_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Feature-space formula ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centered data (independent of the Gram code)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((y.T @ x).pow(2).sum() / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))


def test_cosine_matrix_identical_layers_and_scale():
    x = torch.randn(3, 4, 5)
    x[2] = 3.0 * x[0]
    m = sim.cosine_matrix(x)
    assert m.shape == (3, 3)
    assert torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype))
    assert m[0, 2] == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(float(torch.nn.functional.cosine_similarity(x[0].flatten(), x[1].flatten(), dim=0)), abs=1e-6)


def test_euclidean_matrix_matches_norms():
    x = torch.randn(4, 6)
    m = sim.euclidean_matrix(x)
    assert torch.all(m.diagonal() == 0)
    assert m[1, 3] == pytest.approx(float(torch.linalg.norm(x[1].double() - x[3].double())), rel=1e-9)


def test_linear_cka_matches_feature_space_formula():
    x, y = torch.randn(50, 7, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    y = y + x[:, :3]
    assert sim.linear_cka(x, y) == pytest.approx(_centered_cka(x, y), rel=1e-9)


def test_linear_cka_invariances():
    x = torch.randn(60, 8, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(8, 8, dtype=torch.float64))
    base = sim.linear_cka(x, y)
    assert sim.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert sim.linear_cka(x @ _orthogonal(8), y) == pytest.approx(base, abs=1e-10)   # rotation
    assert sim.linear_cka(5.0 * x, y) == pytest.approx(base, abs=1e-10)              # isotropic scale
    assert sim.linear_cka(x + 3.0, y) == pytest.approx(base, abs=1e-10)              # translation
    anisotropic = x * torch.linspace(0.1, 10.0, 8, dtype=torch.float64)
    assert abs(sim.linear_cka(anisotropic, y) - base) > 1e-3                         # not invariant to this


def test_unbiased_cka_near_zero_for_independent_features():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 50, generator=gen), torch.randn(200, 50, generator=gen)
    biased, unbiased = sim.linear_cka(x, y), sim.linear_cka(x, y, unbiased=True)
    assert abs(unbiased) < 0.05
    assert biased > 3 * abs(unbiased)  # the biased estimator is pulled up at this n/p
    assert sim.linear_cka(x, x, unbiased=True) == pytest.approx(1.0, abs=1e-9)


def test_cka_matrix_is_pairwise_linear_cka():
    feats = torch.randn(4, 30, 6, dtype=torch.float64)
    m = sim.cka_matrix(feats)
    assert m[1, 3] == pytest.approx(sim.linear_cka(feats[1], feats[3]), rel=1e-9)
    assert torch.allclose(m.diagonal(), torch.ones(4, dtype=m.dtype))


def test_unbiased_hsic_needs_four_examples():
    with pytest.raises(ValueError, match="n=3"):
        sim.hsic_matrix(sim.grams(torch.randn(2, 3, 4)), unbiased=True)


def test_subspace_overlap_and_principal_angles():
    q = _orthogonal(10)
    u, v, w = q[:, :3], q[:, 3:6], q[:, [0, 1, 6]]
    assert float(sim.subspace_overlap(u, u)) == pytest.approx(1.0)
    assert float(sim.subspace_overlap(u, v)) == pytest.approx(0.0, abs=1e-12)
    assert float(sim.subspace_overlap(u, w)) == pytest.approx(2 / 3)
    assert float(sim.subspace_overlap(u, u @ _orthogonal(3, seed=2))) == pytest.approx(1.0)  # basis-free
    angles = sim.principal_angles(u, w)
    assert torch.allclose(angles.sort().values, torch.tensor([0.0, 0.0, math.pi / 2], dtype=angles.dtype), atol=1e-6)
    assert float(torch.cos(angles).pow(2).mean()) == pytest.approx(float(sim.subspace_overlap(u, w)), abs=1e-9)


def test_dominant_subspace_finds_planted_basis():
    q = _orthogonal(20)
    basis = q[:, :2]
    x = basis @ torch.randn(2, 12, dtype=torch.float64) * 10 + 1e-3 * torch.randn(20, 12, dtype=torch.float64)
    u = sim.dominant_subspace(x, 2)
    assert u.shape == (20, 2)
    assert float(sim.subspace_overlap(u.double(), basis)) > 0.999
    with pytest.raises(ValueError, match="rank=13"):
        sim.dominant_subspace(x, 13)


def test_overlap_matrix_matches_pairwise():
    bases = sim.dominant_subspace(torch.randn(3, 16, 8), 4)
    m = sim.subspace_overlap_matrix(bases)
    assert m[0, 2] == pytest.approx(float(sim.subspace_overlap(bases[0].double(), bases[2].double())), abs=1e-6)
    assert torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype), atol=1e-5)
    assert sim.chance_overlap(4, 16) == 0.25


def test_token_features_layout():
    x = torch.randn(2, 1, 3, 5, 4)  # (L, B, H, T, d)
    f = sim.token_features(x, "keys")
    assert f.shape == (2, 1, 5, 12)
    assert torch.equal(f[1, 0, 3, 4:8], x[1, 0, 1, 3])  # token 3, head 1


def test_by_distance_and_adjacent():
    m = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.7], [0.2, 0.7, 1.0]])
    d = sim.by_distance(m)
    assert d["distance"].tolist() == [1, 2]
    assert d["mean"].tolist() == pytest.approx([0.8, 0.2])
    assert d["pairs"].tolist() == [2, 1]
    assert sim.adjacent(m)["value"].tolist() == pytest.approx([0.9, 0.7])
    frame = sim.to_frame({("keys", "cosine"): m})
    assert len(frame) == 9 and frame.query("layer_i == 0 and layer_j == 2")["value"].item() == pytest.approx(0.2)


def test_unknown_metric_and_field_rejected():
    with pytest.raises(ValueError, match="bogus"):
        sim.activation_similarity(None, [], metrics=("bogus",))
    with pytest.raises(ValueError, match="queries"):
        sim.activation_similarity(None, [], fields=("queries",))


@pytest.mark.slow
def test_streaming_equals_one_pass_on_the_model(model32):
    model, _ = model32
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5000, (1, 24), generator=gen), torch.randint(0, 5000, (1, 24), generator=gen)
    fields, metrics = ("hidden", "keys_pre_rope", "values"), ("cosine", "euclidean", "cka", "subspace")
    streamed = sim.activation_similarity(model, [a, b], fields=fields, metrics=metrics, rank=4)
    joint = sim.activation_similarity(model, [torch.cat([a, b])], fields=fields, metrics=metrics, rank=4)
    assert streamed[("hidden", "cosine")].shape == (31, 31)
    assert streamed[("values", "cka")].shape == (30, 30)
    for key, matrix in streamed.items():
        assert torch.isfinite(matrix).all(), key
        assert torch.allclose(matrix, joint[key], atol=1e-5), key
    assert torch.allclose(streamed[("keys_pre_rope", "cka")].diagonal(), torch.ones(30, dtype=torch.float64))
    assert torch.allclose(streamed[("values", "subspace")].diagonal(), torch.ones(30, dtype=torch.float64), atol=1e-5)
    off = streamed[("values", "subspace")].fill_diagonal_(float("nan"))
    assert float(off.nanmean()) > sim.chance_overlap(4, 24)  # layers share token subspaces beyond chance


@pytest.mark.slow
def test_weight_similarity(model32):
    model, _ = model32
    out = sim.weight_similarity(model)
    assert set(out) == {(w, m) for w in ("w_k", "w_v") for m in ("cosine", "euclidean", "cka")}
    for key, matrix in out.items():
        assert matrix.shape == (30, 30) and torch.isfinite(matrix).all(), key
    assert torch.allclose(out[("w_k", "cka")].diagonal(), torch.ones(30, dtype=torch.float64))
    w = sim.projection_weights(model, "k")
    assert sim.linear_cka(w[3].T, w[3].T.flip(1)) == pytest.approx(1.0)  # output permutation leaves CKA unchanged


def test_distance_profile_averages_each_diagonal():
    m = torch.arange(16.0).reshape(1, 4, 4)
    profile = sim.distance_profile(m)
    assert profile.shape == (1, 3)
    assert profile[0].tolist() == [(1 + 6 + 11) / 3, (2 + 7) / 2, 3.0]
