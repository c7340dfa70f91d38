"""Feature statistics: computed from an image folder with only the vision tower, stored with
metadata under a content-derived name, and refused when they belong to another model."""
import pytest
import torch
from PIL import Image

from mimic_toolkit.errors import UserError
from mimic_toolkit.features import FeatureRecorder, FeatureStats, compute_stats


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    Image.new("RGB", (40, 32), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (32, 32), (20, 30, 220)).save(root / "nested" / "b.jpg", quality=95)
    Image.new("RGB", (32, 48), (20, 200, 20)).save(root / "c.webp")
    (root / "notes.txt").write_text("not an image")
    return root


def test_statistics_are_the_mean_of_per_image_token_statistics(tiny_llava, image_folder):
    stats = compute_stats(tiny_llava, "llava-llama3", image_folder, batch_size=2)
    assert stats.meta["image_count"] == "3" and stats.sites == list(tiny_llava.feature_sites())
    files = sorted(p for p in image_folder.rglob("*") if p.suffix in (".png", ".jpg", ".webp"))
    with torch.no_grad(), FeatureRecorder(tiny_llava, 3) as recorder:
        tiny_llava.vision_forward(tiny_llava.preprocess([Image.open(p) for p in files]))
    for site, (mean, var) in recorder.stats.items():
        assert torch.allclose(stats.mean[site], mean.mean(0), atol=1e-5)
        assert torch.allclose(stats.var[site], var.mean(0), atol=1e-5)


def test_round_trip_and_content_addressed_name(tiny_llava, image_folder, tmp_path):
    stats = compute_stats(tiny_llava, "llava-llama3", image_folder)
    path = stats.save(tmp_path / "out")
    again = FeatureStats.load(path)
    assert again.meta == stats.meta
    assert all(torch.equal(again.mean[s], stats.mean[s]) and torch.equal(again.var[s], stats.var[s]) for s in stats.sites)
    assert stats.save(tmp_path / "out") == path  # same content, same name
    (image_folder / "a.png").unlink()
    other = compute_stats(tiny_llava, "llava-llama3", image_folder).save(tmp_path / "out")
    assert other != path and other.name.startswith("llava-llama3-32px-2img-")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([path.name, other.name])


def test_a_corrupt_image_is_skipped_and_reported(tiny_llava, image_folder):
    (image_folder / "broken.png").write_bytes(b"\x89PNG not really")
    skipped = []
    stats = compute_stats(tiny_llava, "llava-llama3", image_folder, on_skip=skipped.append)
    assert stats.meta["image_count"] == "3"
    assert len(skipped) == 1 and "broken.png" in skipped[0]


def test_a_folder_without_images_is_refused(tmp_path, tiny_llava):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no images"):
        compute_stats(tiny_llava, "llava-llama3", tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        compute_stats(tiny_llava, "llava-llama3", tmp_path / "nowhere")


def test_mismatched_statistics_are_refused_naming_the_field(tiny_llava, image_folder):
    stats = compute_stats(tiny_llava, "llava-llama3", image_folder)
    stats.check_matches(tiny_llava, "llava-llama3", 32)  # matches: no error
    with pytest.raises(UserError, match="computed for model 'llava-llama3', not 'qwen2-vl'"):
        stats.check_matches(tiny_llava, "qwen2-vl", 32)
    with pytest.raises(UserError, match="resolution 32, this run uses 64"):
        stats.check_matches(tiny_llava, "llava-llama3", 64)
    fewer = FeatureStats({s: stats.mean[s] for s in stats.sites[:-1]}, stats.var, {**stats.meta})
    with pytest.raises(UserError, match=r"lack 1 of the run's feature sites \(vision.layers.1.mlp\)"):
        fewer.check_matches(tiny_llava, "llava-llama3", 32)
    wider = FeatureStats({s: torch.zeros(8) for s in stats.sites}, stats.var, stats.meta)
    with pytest.raises(UserError, match="has 8 channels"):
        wider.check_matches(tiny_llava, "llava-llama3", 32)


def test_a_malformed_statistics_file_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a feature-statistics file"):
        FeatureStats.load(bad)


def test_a_folder_of_statistics_finds_the_concepts_file(tiny_llava, image_folder, tmp_path):
    path = compute_stats(tiny_llava, "llava-llama3", image_folder, class_index=7).save(tmp_path / "s")
    assert FeatureStats.find(tmp_path / "s", "llava-llama3", 7).meta["class_index"] == "7"
    with pytest.raises(UserError, match="class index 8"):
        FeatureStats.find(tmp_path / "s", "llava-llama3", 8)
    assert path.parent == tmp_path / "s"
