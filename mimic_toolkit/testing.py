"""Helpers for testing adapters without a hub: an in-memory word-level tokenizer, and the
contract checks every adapter must pass (a third-party plugin calls `check_adapter` in its tests).
"""
from __future__ import annotations

import re

import torch

from .adapter import IGNORE_INDEX, VLMAdapter

# Words the tiny tokenizers know: enough for the tests' prompts and the default prompt files.
BASIC_WORDS = ("what is in the image choose animal snack shown or a an it this photo describe "
               "shape colour color red blue green yellow circle square cross triangle yes no").split()


def word_tokenizer(words, specials: list[str], chat_template: str, *, bos: str, eos: str, pad: str,
                   unk: str = "<unk>"):
    """A lower-casing word-level `PreTrainedTokenizerFast` built in memory (punctuation split off)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for token in [unk, *specials, *words, *".,?!:;'\"-()"]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos,
                                        pad_token=pad, unk_token=unk, additional_special_tokens=specials)
    tokenizer.chat_template = chat_template
    return tokenizer


def words_of(*texts: str) -> list[str]:
    """Lower- and original-case words of some texts, for a tiny tokenizer's vocabulary."""
    found = []
    for text in texts:
        for word in re.findall(r"[^\s.,?!:;'\"()-]+", text):
            found += [word, word.lower()]
    return list(dict.fromkeys(found))


def tiny_adapter(model_id: str, registry=None) -> VLMAdapter:
    """A tiny random model of a registered model's adapter, answering to that model's id, so the
    plugins' hooks for it (a chat format, say) apply as they would to the loaded checkpoint."""
    from .registry import default_registry

    registry = registry or default_registry()
    spec = registry.adapter_spec(model_id)
    adapter = spec.load_class().tiny()
    adapter.spec, adapter.registry = spec, registry
    return adapter


def check_adapter(adapter: VLMAdapter, batch_size: int = 2) -> None:
    """The adapter contract, checked on a (tiny) model. Raises AssertionError on a violation."""
    from .engine import format_prompt
    from .features import FeatureRecorder

    side = adapter.resolution
    assert side % adapter.patch_size == 0, "resolution must be a multiple of the patch size"
    torch.manual_seed(0)
    prompt = format_prompt(adapter, [("What is in the image?", "a red circle")])

    # image tokens: as many as the model expects, where the prompt says they are
    n_image = adapter.image_token_count()
    ids = prompt.input_ids
    assert len(prompt.image_positions) == n_image, "image_positions must cover every image token"
    assert int((ids == adapter.image_token_id).sum()) == n_image, \
        f"expected {n_image} image tokens in input_ids, found {int((ids == adapter.image_token_id).sum())}"
    assert bool((ids[prompt.image_positions] == adapter.image_token_id).all())

    # labels: exactly the target tokens, at the end of the sequence
    target = adapter.tokenizer("a red circle", add_special_tokens=False).input_ids
    labelled = (prompt.labels != IGNORE_INDEX).nonzero().flatten()
    assert labelled.tolist() == list(range(len(ids) - len(target), len(ids))), "labels must cover only the target"
    assert prompt.target_ids.tolist() == target

    # gradient reaches the pixels; hook sites fire with per-image statistics
    images = torch.randn(batch_size, 3, side, side, device=adapter.device)
    images[1:] = images[1:] * 2 + 1  # images that differ, so per-image statistics must differ
    images.requires_grad_(True)
    sites = adapter.vision_sites()  # canonical names: the same selection means the same on every model
    layers = sum(name.endswith(".mlp") for name in sites)
    canonical = {"vision.patch_embedding"} | {f"vision.layers.{i}{part}" for i in range(layers)
                                              for part in ("", ".attn", ".mlp")}
    assert set(sites) == canonical, f"vision sites must have canonical names: {sorted(set(sites) ^ canonical)}"
    with FeatureRecorder(adapter, batch_size, sites) as recorder:
        logits = adapter.target_logits(images, prompt)
    assert logits.shape[:2] == (batch_size, len(target)), f"logits shape {tuple(logits.shape)}"
    assert set(recorder.stats) == set(sites), f"vision sites that never fired: {sorted(set(sites) - set(recorder.stats))}"
    for site, (mean, var) in recorder.stats.items():
        assert mean.shape[0] == batch_size and var.shape == mean.shape, f"{site}: not per-image"
        assert not torch.allclose(mean[0], mean[1]), f"{site}: images were merged"
    loss = logits.logsumexp(-1).mean() + sum(m.mean() for m, _ in recorder.stats.values())
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0, "no gradient reached the pixels"
    assert all(p.grad is None for p in adapter.model.parameters()), "weights must stay frozen"
    check_language_model(adapter, prompt, images.detach())


def check_language_model(adapter: VLMAdapter, prompt, images: torch.Tensor) -> None:
    """Every LM site fires with [B, L, D] states, unembedding reproduces the model's logits,
    steering edits exactly the chosen positions, and generation records one state per fed token."""
    from .lm import LMRecorder, PositionPolicy, Steering

    sites = adapter.lm_sites()
    layers = len(adapter.language_model.layers)
    assert {"lm.0", "lm.0.attn", "lm.0.mlp", f"lm.{layers - 1}", "lm.final_norm"} <= set(sites)
    batch, length, width = images.shape[0], len(prompt.input_ids), adapter.hidden_size
    with torch.no_grad(), LMRecorder(adapter, sites) as recorder:
        logits = adapter.model(**adapter.pixel_inputs(images), **adapter.text_inputs(prompt, batch)).logits.float()
    hidden = recorder.hidden
    assert set(hidden) == set(sites), f"LM sites that never fired: {sorted(set(sites) - set(hidden))}"
    for site, states in hidden.items():
        heads = site.endswith(".heads")  # the o_proj input: heads x head width
        expected = sites[site].module.in_features if heads else width
        assert states.shape == (batch, length, expected), f"{site}: shape {tuple(states.shape)}"
    embed_calls = []  # lm.embed is the first layer's input, not a module's output: once per forward too
    handle = sites["lm.embed"].register_forward_hook(lambda site, inputs, states: embed_calls.append(states.shape))
    with torch.no_grad():
        adapter.model(**adapter.pixel_inputs(images), **adapter.text_inputs(prompt, batch))
    handle.remove()
    assert embed_calls == [(batch, length, width)], f"lm.embed fired as {embed_calls}"
    tolerance = dict(atol=1e-3, rtol=1e-3)
    assert torch.allclose(adapter.unembed(hidden[f"lm.{layers - 1}"]), logits, **tolerance), "unembed != logits"
    assert torch.allclose(adapter.unembed(hidden["lm.final_norm"], apply_final_norm=False), logits, **tolerance)

    vector = torch.ones(width)
    with torch.no_grad(), Steering(adapter, "lm.0", vector, 1.0, PositionPolicy("last-prompt")), \
            LMRecorder(adapter, ["lm.0"]) as steered:
        adapter.model(**adapter.pixel_inputs(images), **adapter.text_inputs(prompt, batch))
    change = (steered.hidden["lm.0"] - hidden["lm.0"]).abs().amax(dim=(0, 2))
    assert change[-1] > 0.5 and change[:-1].max() < 1e-4, "steering must edit only the chosen positions"

    with LMRecorder(adapter, ["lm.0"]) as recorder:
        new = adapter.generate(images, prompt, max_new_tokens=3)
    assert new.shape[0] == batch and 1 <= new.shape[1] <= 3
    assert recorder.hidden["lm.0"].shape[1] == length + new.shape[1] - 1, "generation must record each fed token"
