"""The adapter contract suite on every registered adapter that declares a tiny architecture (a new
built-in adapter is covered without editing a list), and an adapter written to the old contract,
which still works for one release."""
import pytest
import torch
from PIL import Image

from mimic_plugins.idefics2.adapter import Idefics2Adapter
from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter
from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter
from mimic_toolkit.config import resolve
from mimic_toolkit.engine import vision_sites
from mimic_toolkit.features import compute_stats
from mimic_toolkit.inversion import build_inversion
from mimic_toolkit.registry import build_registry
from mimic_toolkit.testing import check_adapter


def declares_tiny(adapter_class) -> bool:
    try:
        adapter_class.architecture("tiny")
    except (NotImplementedError, KeyError):  # no architectures at all, or none of this size
        return False
    return True


def tiny_adapter_classes() -> list[type]:
    """Each registered adapter class once (several models may share one) that has a tiny size."""
    classes = dict.fromkeys(spec.load_class() for spec in build_registry().adapter_specs().values())
    return [adapter_class for adapter_class in classes if declares_tiny(adapter_class)]


@pytest.mark.parametrize("adapter_class", tiny_adapter_classes(), ids=lambda adapter_class: adapter_class.__name__)
def test_every_tiny_adapter_passes_the_contract(adapter_class):
    check_adapter(adapter_class.tiny())


def test_every_built_in_adapter_declares_a_tiny_architecture():
    """So none drops out of the suite above unnoticed."""
    registry = build_registry()
    built_in = {spec.load_class() for spec in registry.adapter_specs().values() if registry.is_builtin(spec.plugin)}
    assert {LlavaLlama3Adapter, Qwen2VLAdapter, Idefics2Adapter} <= built_in <= set(tiny_adapter_classes())


class OldContractAdapter(LlavaLlama3Adapter):
    """Written before the adapter had parts: it names its feature sites itself (not through
    `patch_embedding` and `vision_layers`) and builds its own tiny model and benchmark architectures."""

    def feature_sites(self):
        tower = self.vision_tower
        return {"vision.patch_embedding": tower.embeddings.patch_embedding,
                "vision.layers.1.mlp": tower.encoder.layers[1].mlp}

    @classmethod
    def tiny(cls, seed=0):
        built = LlavaLlama3Adapter.tiny(seed)
        adapter = cls(built.model, built.tokenizer)
        adapter.built_by_its_own_tiny = True
        return adapter

    @classmethod
    def benchmark_config(cls, size):
        config = LlavaLlama3Adapter.architecture(size)
        config.text_config.num_hidden_layers = 1
        return config


def test_an_adapter_written_to_the_old_contract_inverts_with_its_own_sites(tmp_path):
    adapter = OldContractAdapter.tiny()
    assert adapter.built_by_its_own_tiny
    assert list(vision_sites(adapter)) == ["vision.patch_embedding", "vision.layers.1.mlp"]
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    stats = compute_stats(adapter, "old", tmp_path)
    assert stats.sites == ["vision.patch_embedding", "vision.layers.1.mlp"]

    config = resolve([dict(iterations=3, batch_size=2, resolution=32, scales={"main": 1.0, "feature": 1.0},
                           memory_saving="selective")])
    prompt = adapter.build_prompt([("What is in the image?", "a red circle")])
    with build_inversion(build_registry(), adapter, prompt, config, stats) as inversion:
        assert set(inversion.recorder.modules) == {"vision.patch_embedding", "vision.layers.1.mlp"}
        rows = [inversion.run_step(want_metrics=True) for _ in range(3)]
    assert all(row["terms"]["feature"] > 0 for row in rows) and torch.isfinite(inversion.images).all()
    # selective recomputation finds the vision MLPs among the sites the adapter names
    recomputed = adapter.selectively_recomputed()
    layers = adapter.vision_tower.encoder.layers
    assert any(m is layers[1].mlp for m in recomputed) and not any(m is layers[0].mlp for m in recomputed)


def test_old_architecture_names_still_answer():
    assert OldContractAdapter.architecture("mid").text_config.num_hidden_layers == 1  # its override, by the new name
    with pytest.warns(DeprecationWarning, match="architecture"):
        old = LlavaLlama3Adapter.benchmark_config("mid")  # the old call, on an adapter of the new contract
    assert old.to_dict() == LlavaLlama3Adapter.architecture("mid").to_dict()
