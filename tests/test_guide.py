"""The guide term (R_V, DeepInversion's BatchNorm prior): the loss, its gradient, when the guide is
built, its weights files, the ResNet-50 guide's layout, and a run with the toy's guide."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from mimic_plugins.toy_shapes.guide import ToyGuide, train_guide
from mimic_toolkit import hookimpl, inversion as inversion_module
from mimic_toolkit.config import resolve
from mimic_toolkit.errors import UserError
from mimic_toolkit.guides import Guide, read_weights
from mimic_toolkit.inversion import build_inversion
from mimic_toolkit.registry import build_registry
from mimic_toolkit.resnet import resnet50
from mimic_toolkit.specs import GuideSpec
from mimic_toolkit.terms import StepContext, guide_prior

from test_faults import fails, invoke

SPEC = GuideSpec(id="test", builder="unused:unused", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
MEAN, VAR = torch.tensor([0.2, -0.3, 0.1]), torch.tensor([0.5, 1.5, 1.0])


def two_layer_guide(tmp_path) -> Guide:
    """BatchNorm on the (guide-normalised) image, then BatchNorm on its output, running stats known."""
    module = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    module[0].running_mean.copy_(MEAN)
    module[0].running_var.copy_(VAR)  # the second layer keeps mean 0, var 1: the first layer's output
    return Guide(SPEC, module, tmp_path / "weights.safetensors")


def images_from(mean, var, n=64, side=32, seed=0):
    """Images in [0, 1] whose guide-normalised values are N(mean, var) per channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, side, side, generator=g) * var.sqrt().view(3, 1, 1) + mean.view(3, 1, 1)
    return x * torch.tensor(SPEC.std).view(3, 1, 1) + torch.tensor(SPEC.mean).view(3, 1, 1)


def test_the_loss_is_near_zero_on_the_running_statistics_and_grows_with_a_shift(tmp_path):
    with two_layer_guide(tmp_path) as guide:
        matched = guide(images_from(MEAN, VAR)).item()
        shift = 0.5
        shifted = guide(images_from(MEAN + shift, VAR)).item()
    assert matched < 0.15, matched
    # first layer: mean off by 0.5 in each of 3 channels, weighted 10; second: off by 0.5 / sqrt(var)
    expected = 10 * shift * math.sqrt(3) + shift * (1 / VAR).sum().sqrt().item()
    assert shifted == pytest.approx(expected, rel=0.05), (shifted, expected)


def test_gradient_reaches_the_pixels_and_the_guide_stays_frozen(tmp_path):
    guide = Guide(GuideSpec(id="toy", builder="unused:unused", input_size=64), ToyGuide(), tmp_path / "w")
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.5)  # the VLM's normalisation
    pixels = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)  # resized to the guide's 64 px
    running = [layer.running_mean.clone() for layer in guide.layers]
    with guide:
        ctx = StepContext(pixels=pixels, logits=None, targets=None, features={}, stats=None, patch_size=8,
                          normalisation=(mean, std), guide=guide)
        guide_prior(ctx).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()
    assert not any(p.requires_grad for p in guide.module.parameters()) and not guide.module.training
    assert all(torch.equal(a, layer.running_mean) for a, layer in zip(running, guide.layers))
    assert not guide.layers[0]._forward_pre_hooks  # the hooks are gone once the guide is left


def test_the_guide_is_built_only_when_its_term_is_on(tiny_llava, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(inversion_module, "load_guide", lambda *args: built.append(args) or Guide(
        GuideSpec(id="toy", builder="unused:unused"), ToyGuide(), tmp_path / "w"))
    registry = build_registry()
    prompt = tiny_llava.build_prompt([("What is in the image?", "a red circle")])
    for scale in (0.0, 0.5):
        config = resolve([dict(iterations=2, batch_size=2, jitter=0, resolution=32,
                               scales={"main": 1.0, "guide": scale})])
        with build_inversion(registry, tiny_llava, prompt, config) as inversion:
            terms = inversion.run_step(want_metrics=True)["terms"]
        assert len(built) == (scale > 0) and ("guide" in terms) == (scale > 0)
    assert terms["guide"] > 0 and math.isfinite(terms["guide"])


RUN = ["invert", "--iterations", "2", "--batch-size", "1", "--quiet"]


def test_at_scale_zero_the_weights_file_is_never_read(tmp_path):
    result = invoke(*RUN, "--outputs", tmp_path / "run", "--guide-weights", tmp_path / "absent.safetensors")
    assert result.exit_code == 0, result.output


def _wrong_shapes(path):
    state = ToyGuide().state_dict()
    state["head.weight"] = torch.zeros(7, 64)
    save_file(state, str(path))


def _wrong_keys(path):
    save_file({"conv.weight": torch.zeros(3)}, str(path))


@pytest.mark.parametrize("make, fragment", [
    (None, "does not exist"),
    (lambda p: p.write_bytes(b"\x00garbage, not safetensors" * 20), "truncated or damaged"),
    (_wrong_shapes, "tensor 'head.weight' has shape [7, 64], guide 'toy-shapes-guide' needs [24, 64]"),
    (_wrong_keys, "does not hold the weights of guide 'toy-shapes-guide'"),
])
def test_a_bad_weights_file_is_one_line_and_exit_2(tmp_path, make, fragment):
    path = tmp_path / "guide.safetensors"
    if make:
        make(path)
    result = invoke(*RUN, "--outputs", tmp_path / "run", "--scale", "guide=0.001", "--guide-weights", path)
    fails(result, str(path), fragment)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_resnet50_without_weights_says_so(tmp_path):
    result = invoke(*RUN, "--outputs", tmp_path / "run", "--scale", "guide=0.001", "--guide", "resnet50")
    fails(result, "guide 'resnet50' has no default weights", "--guide-weights")


def test_an_unknown_guide_is_one_line(tmp_path):
    result = invoke(*RUN, "--outputs", tmp_path / "run", "--scale", "guide=0.001", "--guide", "resnet-51")
    fails(result, "unknown guide 'resnet-51'", "resnet50", "toy-shapes-guide")


class Clashing:
    @staticmethod
    @hookimpl
    def register_guides(register):
        register(GuideSpec(id="resnet50", builder="mimic_toolkit.resnet:resnet50"))


def test_a_guide_id_two_plugins_register_is_refused_naming_both():
    with pytest.raises(UserError, match="guide 'resnet50' is provided by two plugins: 'clash' and 'core'"):
        build_registry({"clash": Clashing}).guide_spec("resnet50")


def test_resnet50_has_torchvisions_keys_and_parameter_count(tmp_path):
    model = resnet50()
    keys = list(model.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_mean", "layer2.3.bn3.weight", "layer3.5.conv2.weight",
                "layer4.0.downsample.1.num_batches_tracked", "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert key in keys, key
    assert len(keys) == 320 and "layer2.1.downsample.0.weight" not in keys
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    # its own state dict, saved as torchvision's would be, passes the check (num_batches_tracked may be absent)
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, str(path))
    spec = build_registry().guide_spec("resnet50")
    assert len(read_weights(spec, path)) == 267 and spec.input_size == 224


def test_a_short_run_with_the_toy_guide_records_it(tmp_path):
    result = invoke(*RUN, "--outputs", tmp_path / "run", "--scale", "guide=0.001")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["guide"]["id"] == "toy-shapes-guide" and manifest["guide"]["weights"].endswith("guide.safetensors")
    assert len(manifest["guide"]["sha256"]) == 64
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["guide"] == "toy-shapes-guide" and config["scales"]["guide"] == 0.001
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["terms"]["guide"] > 0


def test_train_guide_writes_weights_the_guide_reads(tmp_path):
    record = train_guide(tmp_path / "guide.safetensors", steps=2, batch=8)
    assert json.loads((tmp_path / "guide_training.json").read_text()) == record
    spec = build_registry().guide_spec("toy-shapes-guide")
    assert set(read_weights(spec, tmp_path / "guide.safetensors")) == set(ToyGuide().state_dict())
