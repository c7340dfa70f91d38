"""Concept decompositions, the assignment problem and purity, on cases small enough to check by hand."""
import itertools

import pytest
import torch

from mimic_toolkit.decompose import Decomposition, fit, hungarian, kmeans, pca, purity, snmf, snmf_codes
from mimic_toolkit.errors import UserError

# Two tight clusters around (4, 0) and (0, 2): every method must find them.
CLUSTERS = torch.tensor([[4.0, 0.1], [4.0, -0.1], [4.2, 0.0], [0.1, 2.0], [-0.1, 2.0], [0.0, 2.2]])
LABELS = ["x", "x", "x", "y", "y", "y"]


def test_kmeans_centroids_are_the_cluster_means_and_activation_is_one_over_one_plus_distance():
    centroids = kmeans(CLUSTERS, 2, seed=0)
    expected = torch.stack([CLUSTERS[:3].mean(0), CLUSTERS[3:].mean(0)])
    order = centroids[:, 0].argsort(descending=True)
    assert torch.allclose(centroids[order], expected, atol=1e-6)
    d = Decomposition("kmeans", torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.zeros(2))
    assert torch.allclose(d.activations(torch.tensor([[0.0, 0.0]])), torch.tensor([[1.0, 1 / 6]]))


def test_snmf_codes_are_shrunk_non_negative_projections_for_orthogonal_atoms():
    rows = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.2]])
    codes = snmf_codes(rows, torch.eye(2), l1=0.5)
    # with orthonormal atoms the penalised non-negative lasso is max(0, z . v - l1) per atom
    assert torch.allclose(codes, torch.tensor([[2.5, 0.0], [0.0, 1.5], [0.5, 0.5], [0.0, 0.0]]), atol=1e-5)


def test_snmf_recovers_sparse_non_negative_atoms():
    atoms = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    codes = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    found_codes, found = snmf(codes @ atoms, 2, l1=0.0, seed=0)
    order = found[:, 0].argsort(descending=True)
    assert torch.allclose(found[order], atoms, atol=1e-3)
    assert torch.allclose(found_codes[:, order], codes, atol=1e-2)
    assert bool((found_codes >= 0).all())


def test_pca_finds_the_line_and_signs_it_towards_the_largest_projection():
    t = torch.tensor([-1.0, -0.5, 0.0, 0.5, 3.0])
    direction = torch.tensor([0.6, 0.8])
    components = pca(t[:, None] * direction + torch.tensor([1.0, 1.0]), 1)
    assert torch.allclose(components[0], direction, atol=1e-5)  # +, since t = 3 is the largest |projection|
    assert torch.allclose(pca(-t[:, None] * direction, 1)[0], -direction, atol=1e-5)


def test_simple_takes_the_rows_of_largest_norm():
    rows = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 3.0], [0.5, 0.5]])
    found = fit(rows, "simple", 2).vectors
    assert found.tolist() == [[5.0, 0.0], [0.0, 3.0]]


@pytest.mark.parametrize("method", ["snmf", "kmeans", "pca"])  # "simple" picks by norm alone
def test_every_method_separates_two_clusters(method):
    d = fit(CLUSTERS, method, 2, seed=0)
    assert d.vectors.shape == (2, 2)
    assignment = d.activations(CLUSTERS).argmax(1).tolist()
    if method == "pca":  # one direction separates them: the sign of the projection on it
        assignment = (((CLUSTERS - d.mean) @ d.vectors[0]) > 0).int().tolist()
    assert purity(assignment, LABELS) == 1.0
    assert torch.allclose(d.direction(0).norm(), torch.tensor(1.0))


def test_more_concepts_than_rows_is_a_user_error():
    with pytest.raises(UserError, match="K=7 concepts need at least 7 samples"):
        fit(CLUSTERS, "kmeans", 7)
    with pytest.raises(UserError, match="--method must be one of"):
        fit(CLUSTERS, "ica", 2)


def test_hungarian_on_a_hand_checked_matrix():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    # row 0 -> 1 (1) would force row 1 -> 0 (2) and row 2 -> 2 (2): total 5, the optimum
    assert hungarian(cost) == [(0, 1), (1, 0), (2, 2)]


def test_hungarian_matches_brute_force_on_square_and_rectangular_matrices():
    generator = torch.Generator().manual_seed(0)
    for n, m in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (2, 4), (4, 2), (3, 5)]:
        for _ in range(5):
            cost = torch.randn(n, m, generator=generator)
            pairs = hungarian(cost)
            assert len(pairs) == min(n, m) and len({c for _, c in pairs}) == len(pairs)
            if n <= m:
                best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
            else:
                best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
            assert float(sum(cost[i, j] for i, j in pairs)) == pytest.approx(float(best))


def test_purity_by_hand():
    # concept 0 holds a, a, b; concept 1 holds b, b: (2 + 2) / 5
    assert purity([0, 0, 0, 1, 1], ["a", "a", "b", "b", "b"]) == pytest.approx(0.8)
