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


def check_adapter(adapter: VLMAdapter, batch_size: int = 2) -> None:
    """The adapter contract, checked on a (tiny) model. Raises AssertionError on a violation."""
    from .features import FeatureRecorder

    side = adapter.resolution
    assert side % adapter.patch_size == 0, "resolution must be a multiple of the patch size"
    torch.manual_seed(0)
    prompt = adapter.build_prompt([("What is in the image?", "a red circle")])

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
    with FeatureRecorder(adapter, batch_size) as recorder:
        logits = adapter.target_logits(images, prompt)
    assert logits.shape[:2] == (batch_size, len(target)), f"logits shape {tuple(logits.shape)}"
    assert set(recorder.stats) == set(adapter.feature_sites()), "every feature site must fire once"
    for site, (mean, var) in recorder.stats.items():
        assert mean.shape[0] == batch_size and var.shape == mean.shape, f"{site}: not per-image"
        assert not torch.allclose(mean[0], mean[1]), f"{site}: images were merged"
    loss = logits.logsumexp(-1).mean() + sum(m.mean() for m, _ in recorder.stats.values())
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0, "no gradient reached the pixels"
    assert all(p.grad is None for p in adapter.model.parameters()), "weights must stay frozen"
