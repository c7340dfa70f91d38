"""The inversion loop: it learns, it is frozen and seeded, and a resumed run ends bit-identical."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mimic_toolkit.config import resolve
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.registry import build_registry
from mimic_toolkit.session import Interrupted, build_config, run_inversion
from mimic_toolkit.terms import BUILTIN_TERMS

SPECS = {spec.name: spec for spec in BUILTIN_TERMS}
TERMS = {name: spec.term for name, spec in SPECS.items()}


def make(adapter, steps=30, **settings):
    config = resolve([dict(iterations=steps, batch_size=2, lr=0.1, jitter=2, resolution=32, seed=0), settings])
    prompt = adapter.build_prompt([("What is in the image?", "a red circle")])
    scales = config.scales or {"main": 1.0}
    return Inversion(adapter, prompt, config, [ActiveTerm.of(SPECS[n], s) for n, s in scales.items()])


def test_a_short_inversion_lowers_the_answer_ce(tiny_llava):
    inversion = make(tiny_llava, jitter=0, flip=False)
    first = inversion.run_step(want_metrics=True)["terms"]["main"]
    for _ in range(28):
        inversion.run_step()
    last = inversion.run_step(want_metrics=True)["terms"]["main"]
    assert last < 0.5 * first


def test_weights_stay_frozen_and_images_stay_in_the_pixel_box(tiny_llava):
    before = [p.clone() for p in tiny_llava.model.parameters()]
    inversion = make(tiny_llava, steps=3)
    for _ in range(3):
        inversion.run_step()
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_llava.model.parameters()))
    assert all(p.grad is None for p in tiny_llava.model.parameters())
    low, high = tiny_llava.pixel_box()
    assert bool(((inversion.images >= low) & (inversion.images <= high)).all())


def test_same_seed_same_images_other_seed_other_images(tiny_llava):
    def final(seed):
        inversion = make(tiny_llava, steps=2, seed=seed)
        inversion.run_step()
        inversion.run_step()
        return inversion.images.detach().clone()

    assert torch.equal(final(0), final(0))
    assert not torch.equal(final(0), final(1))


def test_jitter_shifts_by_at_most_j_pixels_and_flip_mirrors(tiny_llava):
    inversion = make(tiny_llava, steps=2, jitter=3, flip=True)
    images = torch.randn(2, 3, 32, 32)
    seen = set()
    for _ in range(30):
        out = inversion.augment(images)
        assert out.shape == images.shape
        centre = out[..., 3:29, 3:29]
        matches = [(dy, dx, flipped) for dy in range(-3, 4) for dx in range(-3, 4) for flipped in (False, True)
                   if torch.allclose(centre, (images.flip(-1) if flipped else images)[..., 3 + dy:29 + dy, 3 + dx:29 + dx],
                                     atol=1e-6)]  # the pad's arithmetic rounds at the last bit
        assert len(matches) == 1, "the output must be the input moved by at most 3 px (maybe mirrored)"
        seen.add(matches[0])
    assert len({m[:2] for m in seen}) > 5 and {m[2] for m in seen} == {False, True}


def test_cosine_schedule_runs_from_lr_to_min_lr(tiny_llava):
    inversion = make(tiny_llava, steps=10, lr=0.5, min_lr=0.01)
    assert inversion.lr_at(0) == pytest.approx(0.5)
    assert inversion.lr_at(5) == pytest.approx(0.255)
    assert inversion.lr_at(10) == pytest.approx(0.01)


def test_scale_zero_switches_a_term_off(tiny_llava):
    inversion = make(tiny_llava, steps=2, scales={"main": 1.0, "tv_l1": 0.0})
    assert inversion.run_step(want_metrics=True)["terms"].keys() == {"main"}


def _settings(checkpoint, outputs, **extra):
    return dict(model="llava-llama3", checkpoint=str(checkpoint), question="What is in the image?",
                answer="a red circle", iterations=8, batch_size=2, jitter=2, log_every=2, grid_every=4,
                checkpoint_every=3, outputs=str(outputs), scales={"feature": 0.0, "main": 1.0}, **extra)


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tiny_checkpoint, tmp_path):
    registry = build_registry()
    straight = run_inversion(registry, build_config(registry, _settings(tiny_checkpoint, tmp_path / "a")))

    config = build_config(registry, _settings(tiny_checkpoint, tmp_path / "b"))
    calls = []

    def ctrl_c_at_step_5():
        calls.append(1)
        return len(calls) == 5

    with pytest.raises(Interrupted, match="step 5"):
        run_inversion(registry, config, stop_requested=ctrl_c_at_step_5)
    partial = tmp_path / "b.partial"
    assert not (tmp_path / "b").exists() and (partial / "checkpoint.safetensors").is_file()
    assert safe_open(partial / "checkpoint.safetensors", "pt").metadata()["step"] == "5"

    resumed = run_inversion(registry, build_config(registry, {}, resume=str(partial)), resume=str(partial))
    assert resumed == tmp_path / "b" and not partial.exists()
    for name in ("00.png", "01.png"):
        assert (straight / "images" / name).read_bytes() == (resumed / "images" / name).read_bytes()
    a = load_file(straight / "checkpoint.safetensors")["images"]
    b = load_file(resumed / "checkpoint.safetensors")["images"]
    assert torch.equal(a, b)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4, 6, 8]  # no duplicates from the steps replayed after the checkpoint


def test_run_folder_holds_everything_a_user_needs(tiny_checkpoint, tmp_path):
    registry = build_registry()
    folder = run_inversion(registry, build_config(registry, _settings(tiny_checkpoint, tmp_path / "run")))
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "manifest.json", "metrics.jsonl", "images", "grids", "report.html",
            "checkpoint.safetensors"} <= names
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"] == "llava-llama3" and manifest["seed"] == 0
    assert manifest["packages"]["torch"] and manifest["timings"][0]["steps"] == 8
    assert sorted(p.name for p in (folder / "grids").iterdir()) == ["step_000004.png", "step_000008.png"]
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64" in html and "<svg" in html and "P(answer)" in html


def _one_step_gradient(adapter, **settings):
    with make(adapter, steps=1, jitter=0, flip=False, scales={"main": 1.0, "tv_l2": 0.1}, **settings) as inversion:
        loss, _, _ = inversion.objective(inversion.images)
        loss.backward()
        return loss.detach(), inversion.images.grad.clone()


@pytest.mark.parametrize("level", ["selective", "layers"])
def test_memory_saving_gives_the_same_gradient_and_is_undone_on_close(tiny_llava, level):
    from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter

    loss, grad = _one_step_gradient(tiny_llava)
    saving = LlavaLlama3Adapter(tiny_llava.model.__class__(tiny_llava.model.config), tiny_llava.tokenizer)
    saving.model.load_state_dict(tiny_llava.model.state_dict())
    layers = saving.model.model.language_model.layers
    with make(saving, steps=1, jitter=0, flip=False, scales={"main": 1.0, "tv_l2": 0.1}, memory_saving=level) as run:
        if level == "layers":
            assert all(layer.gradient_checkpointing and layer.training for layer in layers)
        else:  # the MLP blocks of the vision tower and the language model, and the language model's norms
            recomputed = saving.selectively_recomputed()
            assert len(recomputed) == 2 + 2 + 2 * 2 and all("forward" in vars(m) for m in recomputed)
        loss_saving, _, _ = run.objective(run.images)
        loss_saving.backward()
        grad_saving = run.images.grad
    assert torch.allclose(loss, loss_saving) and torch.allclose(grad, grad_saving, atol=1e-6)
    assert not any(layer.training or getattr(layer, "gradient_checkpointing", False) for layer in layers)
    assert not any("forward" in vars(m) for m in saving.selectively_recomputed())


def test_feature_hooks_are_removed_when_the_inversion_closes(tiny_llava):
    sites = tiny_llava.feature_sites().values()
    config = resolve([dict(iterations=1, batch_size=2, resolution=32)])
    prompt = tiny_llava.build_prompt([("What is in the image?", "a red circle")])
    with Inversion(tiny_llava, prompt, config, [ActiveTerm.of(SPECS["feature"], 1.0)]):
        assert all(len(m._forward_hooks) == 1 for m in sites)
    assert all(len(m._forward_hooks) == 0 for m in sites)


@pytest.mark.slow
@pytest.mark.parametrize("memory_saving", ["off", "selective"])
def test_compiled_step_matches_the_eager_step(tiny_llava, memory_saving):
    loss, grad = _one_step_gradient(tiny_llava)
    loss_compiled, grad_compiled = _one_step_gradient(tiny_llava, compile=True, memory_saving=memory_saving)
    assert torch.allclose(loss, loss_compiled, atol=1e-5) and torch.allclose(grad, grad_compiled, atol=1e-5)


def test_fourier_parameterisation_learns_stays_in_the_box_and_resumes(tiny_llava):
    inversion = make(tiny_llava, parameterisation="fourier", jitter=0, flip=False, lr=0.05)
    low, high = tiny_llava.pixel_box()
    assert inversion.images.shape == (2, 3, 32, 32)
    first = inversion.run_step(want_metrics=True)["terms"]["main"]
    for _ in range(27):
        inversion.run_step()
    state = copy.deepcopy(inversion.state_dict())  # the optimiser's state is shared, not copied
    last = inversion.run_step(want_metrics=True)["terms"]["main"]
    assert last < first
    assert bool(((inversion.images >= low) & (inversion.images <= high)).all())
    again = make(tiny_llava, parameterisation="fourier", jitter=0, flip=False, lr=0.05)
    again.load_state_dict(state)
    again.run_step()
    assert torch.equal(again.images, inversion.images)


def test_fourier_blank_init_is_mid_grey(tiny_llava):
    inversion = make(tiny_llava, parameterisation="fourier", init="blank")
    low, high = tiny_llava.pixel_box()
    assert torch.allclose(inversion.images, ((low + high) / 2).expand_as(inversion.images))
