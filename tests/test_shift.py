"""Fine-tuning shift on hand-made features: each cluster moves by a known vector, so the shift
vectors, the Hungarian matching and the recovery measures are known exactly."""
import pytest
import torch

from mimic_toolkit.errors import UserError
from mimic_toolkit.shift import shift_analysis

from lm_helpers import clusters, write_features

CENTRES = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
SHIFTS = torch.tensor([[0.0, 0.0, 0.0, 3.0], [1.0, 0.0, 0.0, 1.0], [0.0, -2.0, 0.0, 0.0]])


@pytest.fixture
def pair(tmp_path):
    rows, owner = clusters(CENTRES, 5)
    original = write_features(tmp_path / "original", rows)
    # the fine-tuned features list the same samples in another order
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))
    moved = rows + SHIFTS[owner]
    finetuned = write_features(tmp_path / "finetuned", moved[order], ids=[f"s{int(n)}" for n in order])
    return original, finetuned, rows, owner


def test_shift_vectors_are_recovered_and_shifted_concepts_match_the_finetuned_ones(pair):
    original, finetuned, rows, owner = pair
    result = shift_analysis(original, finetuned, method="kmeans", k=3, top=5)
    assert result["samples"] == 15 and len(result["concepts"]) == 3
    assert sorted(r["match"] for r in result["concepts"]) == [0, 1, 2]
    for row in result["concepts"]:
        assert row["samples"] == 5
        assert row["shift_norm"] == pytest.approx(float(SHIFTS.norm(dim=1)[_cluster_of(row, rows, owner)]), abs=1e-4)
        assert row["cosine_shifted"] == pytest.approx(1.0, abs=1e-5)
        assert row["distance_shifted"] == pytest.approx(0.0, abs=1e-4)
        assert row["top_overlap_shifted"] == 1.0
        assert row["cosine_original"] < row["cosine_shifted"]
    summary = result["summary"]
    assert summary["distance_improvement"] == pytest.approx(float(SHIFTS.norm(dim=1).mean()), abs=1e-3)


def _cluster_of(row, rows, owner):
    """The true cluster of a concept: the clusters are tight, so all its samples lie in one."""
    from mimic_toolkit.decompose import fit

    members = fit(rows, "kmeans", 3, seed=0).activations(rows).argmax(1) == row["concept"]
    return int(owner[members][0])


def test_unpaired_samples_and_other_sites_are_refused(pair, tmp_path):
    original, _, rows, _ = pair
    fewer = write_features(tmp_path / "fewer", rows[:14])
    with pytest.raises(UserError, match="paired samples: sample 's14'"):
        shift_analysis(original, fewer, k=3)
    elsewhere = write_features(tmp_path / "elsewhere", rows, site="lm.0")
    with pytest.raises(UserError, match="site"):
        shift_analysis(original, elsewhere, k=3)
    with pytest.raises(UserError, match="K=16 concepts need at least 16"):
        shift_analysis(original, pair[1], k=16)
