"""The engine's three hooks (loading, vision-tower sites, prompt formatting): a plugin overrides
each for one model, and the inversion, `mimic stats` and `mimic compare` see the override; a plugin
that answers None changes nothing."""
import json

import pytest
from PIL import Image

from mimic_toolkit import hookimpl
from mimic_toolkit.compare import run_compare
from mimic_toolkit.engine import format_prompt, load_model, vision_sites
from mimic_toolkit.features import compute_stats
from mimic_toolkit.registry import build_registry
from mimic_toolkit.session import build_config, run_inversion

SYSTEM = "describe the shape or colour"  # words the tiny tokenizer knows


class Overrides:
    """For llava-llama3 only: loading marks the adapter, sites keep the last layer's MLP, prompts
    gain a system turn. Every call is logged."""

    def __init__(self, model_id="llava-llama3"):
        self.model_id, self.log = model_id, []

    @hookimpl
    def mimic_load_model(self, spec, source, options):
        if spec.id != self.model_id:
            return None
        adapter = spec.load_class().load(source, **options.as_kwargs(), spec=spec)
        adapter.loaded_by_plugin = True
        self.log.append(("load", source))
        return adapter

    @hookimpl
    def mimic_vision_sites(self, adapter, selection):
        if adapter.model_id != self.model_id:
            return None
        last = max(name for name in adapter.vision_sites() if name.endswith(".mlp"))
        self.log.append(("sites", last))
        return {last: adapter.vision_sites()[last]}

    @hookimpl
    def mimic_format_prompt(self, adapter, turns, target):
        if adapter.model_id != self.model_id:
            return None
        self.log.append(("prompt", target))
        return adapter.build_prompt(turns, target, system=SYSTEM)


class PassThrough:
    @hookimpl
    def mimic_load_model(self, spec, source, options):
        return None

    @hookimpl
    def mimic_vision_sites(self, adapter, selection):
        return None

    @hookimpl
    def mimic_format_prompt(self, adapter, turns, target):
        return None


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    return folder


def invert(registry, checkpoint, stats, outputs):
    flags = dict(model="llava-llama3", checkpoint=str(checkpoint), question="What is in the image?",
                 answer="a red circle", iterations=3, batch_size=1, jitter=0, device="cpu", log_every=1,
                 stats=str(stats), outputs=str(outputs))
    run = run_inversion(registry, build_config(registry, flags))
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_hook_overrides_one_model_and_the_inversion_and_stats_see_it(tiny_checkpoint, images, tmp_path):
    plugin = Overrides()
    registry = build_registry({"overrides": plugin})
    adapter = load_model("llava-llama3", checkpoint=str(tiny_checkpoint), device="cpu", registry=registry)
    assert adapter.loaded_by_plugin and adapter.registry is registry

    prompt = format_prompt(adapter, [("What is in the image?", "a red circle")])
    plain = adapter.build_prompt([("What is in the image?", "a red circle")])
    assert SYSTEM in adapter.tokenizer.decode(prompt.input_ids)
    assert len(prompt.input_ids) > len(plain.input_ids) and prompt.target_ids.tolist() == plain.target_ids.tolist()

    stats = compute_stats(adapter, "llava-llama3", images)  # what `mimic stats` runs
    assert stats.sites == ["vision.layers.1.mlp"]

    plugin.log.clear()
    rows = invert(registry, tiny_checkpoint, stats.save(tmp_path / "stats"), tmp_path / "run")
    assert ("load", str(tiny_checkpoint)) in plugin.log and ("sites", "vision.layers.1.mlp") in plugin.log
    assert ("prompt", True) in plugin.log
    assert rows[-1]["terms"]["feature"] > 0


def test_compare_loads_and_prompts_every_model_through_the_hooks(tiny_checkpoint, tmp_path):
    plugin = Overrides()
    registry = build_registry({"overrides": plugin})
    flags = dict(question="What is in the image?", answer="a red circle", iterations=2, batch_size=1, device="cpu",
                 scales={"feature": 0.0})
    folder = run_compare(registry, ["llava-llama3"], flags, tmp_path / "cmp", {"llava-llama3": str(tiny_checkpoint)},
                         say=lambda message: None)
    assert json.loads((folder / "comparison.json").read_text())["transfer"]
    loads = [entry for entry in plugin.log if entry[0] == "load"]
    assert len(loads) == 2  # the inversion, then the judge of the transfer matrix
    assert ("prompt", True) in plugin.log and ("prompt", False) in plugin.log  # scored, then generated


def test_a_plugin_answering_none_changes_nothing(tiny_checkpoint, images, tmp_path):
    plain, passing = build_registry(), build_registry({"pass": PassThrough()})
    stats = compute_stats(load_model("llava-llama3", checkpoint=str(tiny_checkpoint), device="cpu", registry=plain),
                          "llava-llama3", images).save(tmp_path / "stats")
    before = invert(plain, tiny_checkpoint, stats, tmp_path / "a")
    after = invert(passing, tiny_checkpoint, stats, tmp_path / "b")
    for old, new in zip(before, after):
        assert abs(old["loss"] - new["loss"]) <= 1e-6 * max(1.0, abs(old["loss"]))


def test_an_override_for_one_model_leaves_the_others_alone(tiny_qwen_checkpoint):
    registry = build_registry({"overrides": Overrides()})
    adapter = load_model("qwen2-vl", checkpoint=str(tiny_qwen_checkpoint), device="cpu", registry=registry)
    assert not hasattr(adapter, "loaded_by_plugin")
    assert list(vision_sites(adapter)) == list(adapter.feature_sites())
    turns = [("What is in the image?", "a red circle")]
    assert format_prompt(adapter, turns).input_ids.tolist() == adapter.build_prompt(turns).input_ids.tolist()


@pytest.fixture(scope="module")
def tiny_qwen_checkpoint(tmp_path_factory):
    from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter

    folder = tmp_path_factory.mktemp("qwen")
    Qwen2VLAdapter.tiny().save(folder)
    return folder


class Broken:
    """Every engine question raises, for every model: a plugin bug, not bad input."""

    @hookimpl
    def mimic_load_model(self, spec, source, options):
        raise RuntimeError("load bug")

    @hookimpl
    def mimic_format_prompt(self, adapter, turns, target):
        raise KeyError("prompt bug")


def test_a_plugin_whose_answer_raises_is_one_warning_and_the_default_answers(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("MIMIC_STRICT_PLUGINS", raising=False)
    registry = build_registry({"broken": Broken()})
    adapter = load_model("llava-llama3", checkpoint=str(tiny_checkpoint), device="cpu", registry=registry)
    turns = [("What is in the image?", "a red circle")]
    assert format_prompt(adapter, turns).input_ids.tolist() == adapter.build_prompt(turns).input_ids.tolist()
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "'broken' failed in mimic_load_model" in warnings[0]  # then it is left out


def test_a_plugins_user_error_is_the_users_one_line(tmp_path):
    from mimic_toolkit.errors import UserError

    registry = build_registry({"overrides": Overrides()})  # it loads through the adapter's own checks
    with pytest.raises(UserError, match="does not exist"):
        load_model("llava-llama3", checkpoint=str(tmp_path / "nowhere"), device="cpu", registry=registry)
