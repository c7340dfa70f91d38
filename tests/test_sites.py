"""`--feature-sites`: canonical vision-site names on every layout, the selection grammar, and the
selection carried through `mimic stats`, `--stats` checks, the inversion and `mimic models --sites`."""
import json

import pytest
import torch
from typer.testing import CliRunner

from mimic_toolkit.cli import app
from mimic_toolkit.config import resolve
from mimic_toolkit.engine import vision_sites
from mimic_toolkit.errors import UserError
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.sites import select_sites
from mimic_toolkit.terms import feature_statistics

runner = CliRunner()


def tiny(model):
    from mimic_plugins.idefics2.adapter import Idefics2Adapter
    from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter
    from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter

    return {"llava": LlavaLlama3Adapter, "qwen": Qwen2VLAdapter, "idefics2": Idefics2Adapter}[model].tiny()


@pytest.fixture(scope="module", params=["llava", "qwen", "idefics2"])
def adapter(request):
    return tiny(request.param)


def names(adapter, selection):
    return list(select_sites(adapter.vision_sites(), selection))


def test_every_layout_has_the_same_canonical_names(adapter):
    assert list(adapter.vision_sites()) == [
        "vision.patch_embedding", "vision.layers.0", "vision.layers.0.attn", "vision.layers.0.mlp",
        "vision.layers.1", "vision.layers.1.attn", "vision.layers.1.mlp"]
    assert list(adapter.feature_sites()) == ["vision.patch_embedding", "vision.layers.0.mlp", "vision.layers.1.mlp"]


def test_the_selection_grammar(adapter):
    assert names(adapter, "last:1") == ["vision.layers.1.mlp"]
    assert names(adapter, "vision.layers.[1-9].mlp,vision.patch_embedding") == ["vision.patch_embedding",
                                                                              "vision.layers.1.mlp"]
    assert names(adapter, "vision.layers.0-1.attn") == ["vision.layers.0.attn", "vision.layers.1.attn"]
    assert names(adapter, "vision.layers.1") == ["vision.layers.1"]  # a glob matches whole names only
    assert names(adapter, None) == list(adapter.feature_sites())
    with pytest.raises(UserError, match="'vision.blocks.0.mlp' names no site.*vision.layers.{0..1}.mlp"):
        names(adapter, "vision.blocks.0.mlp")
    with pytest.raises(UserError, match="from 1 to 2"):
        names(adapter, "last:3")


def test_every_selectable_site_gives_per_image_statistics_on_every_layout(adapter):
    """Block outputs and attention branches too, whatever their output type (tuples, packed rows)."""
    config = resolve([dict(iterations=1, batch_size=2, resolution=adapter.resolution, jitter=0,
                           feature_sites="vision.layers.*")])
    prompt = adapter.build_prompt([("What is in the image?", "a red circle")])
    inversion = Inversion(adapter, prompt, config, [ActiveTerm("feature", feature_statistics, 1.0, reads=("vision_statistics",))])
    with inversion:
        inversion.adapter.target_logits(torch.randn(2, 3, adapter.resolution, adapter.resolution), prompt)
        stats = inversion.recorder.stats
    assert sorted(stats) == ["vision.layers.0", "vision.layers.0.attn", "vision.layers.0.mlp",
                             "vision.layers.1", "vision.layers.1.attn", "vision.layers.1.mlp"]
    for site, (mean, var) in stats.items():
        assert mean.shape[0] == 2 and var.shape == mean.shape and not torch.allclose(mean[0], mean[1]), site


def test_the_default_hook_is_the_selection():
    llava = tiny("llava")
    assert list(vision_sites(llava, "last:1")) == ["vision.layers.1.mlp"]


def test_toy_invert_with_a_subset_of_the_shipped_statistics(in_tmp):
    """The shipped files hold every default site; a run may match any subset of them."""
    result = runner.invoke(app, ["invert", "--feature-sites", "last:1", "--iterations", "2", "--quiet",
                                 "--outputs", "run"])
    assert result.exit_code == 0, result.output
    config = (in_tmp / "run" / "config.yaml").read_text()
    assert "feature_sites: last:1" in config


def test_stats_record_the_selection_and_a_run_with_other_sites_is_refused(in_tmp, tiny_checkpoint):
    from PIL import Image

    (in_tmp / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (200 * i, 30, 30)).save(in_tmp / "images" / f"{i}.png")
    result = runner.invoke(app, ["stats", "--model", "llava-llama3", "--checkpoint", str(tiny_checkpoint),
                                 "--images", "images", "--out", "stats", "--feature-sites", "last:1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (path,) = (in_tmp / "stats").iterdir()
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    assert header["feature_sites"] == "last:1" and json.loads(header["sites"]) == ["vision.layers.1.mlp"]
    common = ["invert", "--model", "llava-llama3", "--checkpoint", str(tiny_checkpoint), "--stats", str(path),
              "--question", "What is in the image?", "--answer", "red", "--iterations", "1", "--batch-size", "1",
              "--quiet", "--device", "cpu"]
    refused = runner.invoke(app, common + ["--outputs", "a"])  # default sites: more than the file has
    assert refused.exit_code == 2
    assert "lack 2 of the run's feature sites" in refused.stderr and "made with sites 'last:1'" in refused.stderr
    assert not (in_tmp / "a").exists() and not (in_tmp / "a.partial").exists()
    matched = runner.invoke(app, common + ["--outputs", "b", "--feature-sites", "vision.layers.1.mlp"])
    assert matched.exit_code == 0, matched.output


def test_models_sites_lists_canonical_names_without_weights():
    result = runner.invoke(app, ["models", "--sites", "llava-llama3", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert "declared full-size architecture" in listing["from"]
    assert len(listing["sites"]) == 1 + 3 * 24  # CLIP ViT-L/14: 24 layers
    assert sum(listing["sites"].values()) == 25 and listing["sites"]["vision.layers.23.mlp"]
    toy = json.loads(runner.invoke(app, ["models", "--sites", "toy", "--json"]).output)
    assert "checkpoint" in toy["from"] and len(toy["sites"]) == 1 + 3 * 4
