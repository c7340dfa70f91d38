"""A shift added to every attention head's output, before `o_proj`, without copying any model's
attention forward.

transformers 5.x calls the attention function registered under `config._attn_implementation`
with the queries after RoPE and the keys after the cache update (`transformers.AttentionInterface`).
`ShiftedAttention` registers a wrapper around the model's own function (sdpa or eager), switches
the language model's config to it for the `with` block and restores it after. The wrapper calls the
original, then adds `shift.head_shift(...)` for the layers the shift covers. The shift receives
what MimIC's gate needs: the post-RoPE query, the cached keys and the log of the query's own
softmax normaliser, `logsumexp_j(q . k_j * scale)` over the keys the mask lets it see, in fp32.

Attention over [demonstrations + own keys] splits exactly into the own-key output `a` and the
demonstrations' output `a_D`: `a + mu * (a_D - a)`, `mu = sigmoid(log Z_D - log Z_own)`. MimIC
learns `mu * v` in place of the second term; `ExactShift` computes it from true demonstration keys
and values (the check that the wrapper is exact, and a reference point).
"""
from __future__ import annotations

import sys

import torch

from .errors import UserError

WRAPPED = ("sdpa", "eager")  # the implementations whose mask formats (none, boolean, additive) we read
_ACTIVE: dict[int, tuple["ShiftedAttention", int]] = {}  # id(attention module) -> (context, layer)


def _base_function(name: str, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":  # not registered: each model file has its own eager_attention_forward
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _wrapper(original: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        output, weights = _base_function(original, module)(module, query, key, value, attention_mask,
                                                           scaling=scaling, dropout=dropout, **kwargs)
        active = _ACTIVE.get(id(module))
        if active is None:
            return output, weights
        context, layer = active
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        delta = context.shift.head_shift(layer, query, key, value, output, attention_mask, scale)
        if delta is not None:
            output = output + delta.to(output.dtype)
        context.calls.add(layer)
        return output, weights
    return attention


def _register(original: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"mimic_icl_{original}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrapper(original))
        # the masks the original implementation expects, so the wrapped function gets the same
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def scaled_scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """q . k * scale, fp32 [B, H, T, S]; query [B, H, T, d], key [B, H_kv, S, d] (grouped-query
    attention: H = groups * H_kv, the heads of a group consecutive)."""
    b, heads, t, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    grouped = query.float().reshape(b, kv_heads, heads // kv_heads, t, d)
    return torch.einsum("bkgtd,bksd->bkgts", grouped, key.float()).reshape(b, heads, t, s) * scale


def own_scores(query: torch.Tensor, key: torch.Tensor, attention_mask, scale: float) -> torch.Tensor:
    """q . k * scale over the keys each query may see, fp32 [B, H, T, S]; hidden keys are the
    lowest float (not -inf: a fully masked padding row keeps finite gradients).
    query [B, H, T, d]; key [B, H_kv, S, d] (grouped-query attention: H = groups * H_kv)."""
    scores = scaled_scores(query, key, scale)
    t, s = scores.shape[2], scores.shape[3]
    lowest = torch.finfo(torch.float32).min
    if attention_mask is None:  # causal (a query sees every key up to its own position), as sdpa reads it
        if t > 1:
            rows = torch.arange(t, device=query.device)[:, None] + (s - t)
            scores = scores.masked_fill(torch.arange(s, device=query.device)[None, :] > rows, lowest)
        return scores
    mask = attention_mask[..., :s]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, lowest)
    return (scores + mask.float()).clamp_min(lowest)


def log_normaliser(query, key, attention_mask, scale: float) -> torch.Tensor:
    """logsumexp_j(q . k_j * scale) over the visible keys, fp32 [B, H, T]."""
    return own_scores(query, key, attention_mask, scale).logsumexp(-1)


def attention_layers(adapter) -> list[torch.nn.Module]:
    """The language model's attention modules, in layer order."""
    return [layer.self_attn for layer in adapter.language_model.layers]


class ShiftedAttention:
    """`with ShiftedAttention(adapter, shift):` every forward of the language model adds
    `shift.head_shift(layer, query, key, value, output, mask, scale)` ([B, T, H, d] or None) to
    each head's output before `o_proj`. The attention implementation is restored on exit."""

    def __init__(self, adapter, shift):
        self.adapter, self.shift = adapter, shift
        self.layers = attention_layers(adapter)
        self.configs = list({id(m.config): m.config for m in self.layers}.values())
        self.calls: set[int] = set()
        self._saved = []

    def __enter__(self):
        for config in self.configs:
            original = config._attn_implementation
            if original not in WRAPPED:
                raise UserError(f"mimic icl shifts attention implemented as {' or '.join(WRAPPED)}; this model's "
                                f"language model uses '{original}' (load it with one of those)")
            self._saved.append((config, original))
        for config, original in self._saved:
            config._attn_implementation = _register(original)
        for i, module in enumerate(self.layers):
            _ACTIVE[id(module)] = (self, i)
        return self

    def __exit__(self, *exc):
        for module in self.layers:
            _ACTIVE.pop(id(module), None)
        for config, original in reversed(self._saved):
            config._attn_implementation = original
        self._saved.clear()


class _NoShift:
    def head_shift(self, *args):
        return None


def check_attention_interface(adapter, model_id: str) -> None:
    """Refuse, by name, a model whose language-model attention does not call transformers'
    attention interface: a two-token forward must reach the wrapper in every layer."""
    ids = torch.tensor([[adapter.tokenizer.eos_token_id or 0] * 2], device=adapter.device)
    context = ShiftedAttention(adapter, _NoShift())
    with torch.no_grad(), context:
        adapter.language_model(input_ids=ids, use_cache=False)
    missing = sorted(set(range(len(context.layers))) - context.calls)
    if missing:
        raise UserError(f"model '{model_id}': the attention of language-model layers {missing} does not call "
                        "transformers' attention interface, so mimic icl cannot shift it")


class ExactShift:
    """The exact effect of demonstrations whose post-RoPE keys and values per layer are given
    ([B, H_kv, N, d] each, as the few-shot pass cached them): `mu * (a_D - a)` with
    `mu = sigmoid(log Z_D - log Z_own)`, at positions >= `start` (earlier positions come before
    the demonstrations). A zero-shot pass at the few-shot pass's positions then reproduces it."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], start: int):
        self.keys, self.values, self.start = keys, values, start

    def head_shift(self, layer, query, key, value, output, attention_mask, scale):
        t, s = query.shape[2], key.shape[2]
        first = s - t  # the index of the first query among the keys (the cache before it)
        demo_keys, demo_values = self.keys[layer], self.values[layer]
        log_own = log_normaliser(query, key, attention_mask, scale)
        demo_scores = scaled_scores(query, demo_keys, scale)  # every demonstration precedes the query
        log_demo = demo_scores.logsumexp(-1)
        groups = query.shape[1] // demo_keys.shape[1]
        demo_out = torch.einsum("bhts,bhsd->bhtd", demo_scores.softmax(-1),
                                demo_values.float().repeat_interleave(groups, dim=1))
        mu = torch.sigmoid(log_demo - log_own)
        delta = mu[..., None] * (demo_out - output.float().transpose(1, 2))  # [B, H, T, d]
        after = (torch.arange(first, s, device=query.device) >= self.start)[None, None, :, None]
        return (delta * after).transpose(1, 2)
