"""Concepts: whole-word grounding, the word-overlap metric, a fitted concepts folder with its
report, projection of new samples, and refusals."""
import json

import pytest
import torch

from mimic_toolkit.concepts import ConceptSet, fit_concepts, ground_words, project, whole_word_tokens, word_overlap
from mimic_toolkit.decompose import purity
from mimic_toolkit.errors import UserError

from lm_helpers import bpe_tokenizer, clusters, colour_images, write_features


def test_whole_words_drop_pieces_short_tokens_and_stop_words(tiny_llava):
    assert list(whole_word_tokens(bpe_tokenizer()).values()) == ["red"]  # not "ber", "bl", "ue", "the"
    words = set(whole_word_tokens(tiny_llava.tokenizer).values())
    assert {"circle", "red", "colour", "triangle"} <= words
    assert not words & {"the", "is", "a", "or", "what", "<unk>", "user"}  # stop words, specials ("user" is one)


def test_a_vector_along_a_words_unembedding_is_grounded_in_that_word(tiny_llava):
    head = tiny_llava.model.get_output_embeddings().weight
    circle = tiny_llava.tokenizer.convert_tokens_to_ids("circle")
    words = ground_words(tiny_llava, head[circle][None] * 10, apply_final_norm=False, count=3)
    assert words[0][0] == "circle" and len(words[0]) == 3


def test_word_overlap_is_the_mean_pairwise_jaccard():
    assert word_overlap([["a", "b"], ["b", "c"], ["d"]]) == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert word_overlap([["a"]]) == 0.0


@pytest.fixture
def labelled(tmp_path):
    """12 samples in 3 colour clusters, width 64 (the tiny LLaVA's), with images and labels."""
    centres = torch.zeros(3, 64)
    centres[0, 0], centres[1, 1], centres[2, 2] = 5.0, 5.0, 5.0
    rows, owner = clusters(centres, 4)
    names = ["red", "green", "blue"]
    images = colour_images(tmp_path / "images", [names[c] for c in owner])
    return write_features(tmp_path / "features", rows, labels=[{"colour": names[c]} for c in owner], images=images)


def test_fit_writes_vectors_grounding_metrics_and_a_self_contained_report(labelled, tiny_llava, tmp_path):
    folder = fit_concepts(labelled, "kmeans", 3, tmp_path / "concepts", adapter=tiny_llava, words=4, images=2)
    assert sorted(p.name for p in folder.iterdir()) == ["concepts.json", "concepts.safetensors", "report.html"]
    summary = json.loads((folder / "concepts.json").read_text())
    assert summary["meta"]["metrics"]["purity"] == {"colour": 1.0}
    assert 0 <= summary["meta"]["metrics"]["word_overlap"] <= 1
    for card in summary["concepts"]:
        assert card["samples"] == 4 and len(card["words"]) == 4 and len(card["top"]) == 2
        colours = {labelled.index[int(t["id"][1:])]["labels"]["colour"] for t in card["top"]}
        assert len(colours) == 1  # a concept's top images share its colour
    page = (folder / "report.html").read_text()
    assert page.count("class=card") == 3 and page.count("data:image/png;base64,") == 6 and "http" not in page
    loaded = ConceptSet.load(folder)
    assert loaded.decomposition.vectors.shape == (3, 64) and loaded.meta["model"] == "llava-llama3"


def test_projection_gives_new_samples_their_concepts(labelled, tmp_path):
    folder = fit_concepts(labelled, "snmf", 3, tmp_path / "concepts")
    concepts = ConceptSet.load(folder / "concepts.safetensors")
    rows = project(concepts, labelled, top=2)
    assert [len(r["activations"]) for r in rows] == [3] * 12 and all(len(r["top"]) == 2 for r in rows)
    strongest = [r["top"][0]["concept"] for r in rows]
    assert purity(strongest, [e["labels"]["colour"] for e in labelled.index]) == 1.0
    assert sorted(strongest.count(c) for c in range(3)) == [4, 4, 4]
    other = write_features(tmp_path / "other", [torch.zeros(64)], model="qwen2-vl")
    with pytest.raises(UserError, match="fitted on model 'llava-llama3'"):
        project(concepts, other)


def test_more_concepts_than_samples_and_existing_outputs_are_refused(labelled, tmp_path):
    with pytest.raises(UserError, match="K=13 concepts need at least 13"):
        fit_concepts(labelled, "kmeans", 13, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        fit_concepts(labelled, "kmeans", 2, tmp_path / "taken")


def test_a_file_that_is_not_a_concepts_file_is_named(labelled, tmp_path):
    with pytest.raises(UserError, match="is not a concepts file"):
        ConceptSet.load(labelled.folder / "shard-00000.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="is not a concepts file"):
        ConceptSet.load(tmp_path / "junk.safetensors")
