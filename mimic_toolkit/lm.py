"""Hooks on language-model sites (`adapter.lm_sites()`): recording hidden states over a forward
pass or a whole generation, and adding a steering vector at the positions a policy picks.

Both count sequence positions the same way: a call with more than one position is a new
sequence (a forward pass, or the prompt pass of a generation); a call with one position is the
next generated token. So they work with `model.generate` and its KV cache, for every adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import VLMAdapter
from .errors import UserError
from .hooks import SiteHooks


def _first(output):
    """Decoder layers return a tensor (a tuple in older transformers), attention a tuple."""
    return output[0] if isinstance(output, tuple) else output


class LMRecorder(SiteHooks):
    """Forward hooks that record LM sites; `hidden[site]` is [B, positions, D] as the model
    computed it (still attached to the graph outside `torch.no_grad`). During generation the last
    generated token is never fed back, so T new tokens give prompt + T - 1 positions."""

    def __init__(self, adapter: VLMAdapter, sites):
        super().__init__({site: adapter.lm_site(site) for site in sites})
        self.chunks: dict[str, list[torch.Tensor]] = {site: [] for site in self.modules}

    def on_output(self, site, output):
        states = _first(output)
        if states.shape[1] > 1:
            self.chunks[site] = []
        self.chunks[site].append(states)

    @property
    def hidden(self) -> dict[str, torch.Tensor]:
        return {site: torch.cat(chunks, 1) for site, chunks in self.chunks.items() if chunks}


@dataclass(frozen=True)
class PositionPolicy:
    """Where a steering vector is added: `all` positions (image tokens included), `generated`
    tokens only (the first answer token is predicted before any of them, so it never changes),
    the `last-prompt` token only, or every position `from:N` on (N counts from the sequence start)."""

    kind: str
    start: int = 0

    @classmethod
    def parse(cls, text: str) -> "PositionPolicy":
        if text in ("all", "generated", "last-prompt"):
            return cls(text)
        head, _, number = text.partition(":")
        if head == "from" and number.isdigit():
            return cls("from", int(number))
        raise UserError(f"positions must be all, generated, last-prompt or from:N, not '{text}'")

    def mask(self, first: int, count: int, prompt_length: int) -> torch.Tensor:
        """Which of the positions first .. first + count - 1 are steered, [count] bool."""
        positions = torch.arange(first, first + count)
        if self.kind == "all":
            return torch.ones(count, dtype=torch.bool)
        if self.kind == "generated":
            return positions >= prompt_length
        if self.kind == "last-prompt":
            return positions == prompt_length - 1
        return positions >= self.start

    def __str__(self) -> str:
        return f"from:{self.start}" if self.kind == "from" else self.kind


class Steering(SiteHooks):
    """Adds `alpha * vector` to an LM site's output at the policy's positions, on the prompt pass
    and on every generated token. The hook runs before any other (`prepend`), so hooks that
    transformers adds on the first forward to record outputs see the steered states too."""

    prepend = True

    def __init__(self, adapter: VLMAdapter, site: str, vector: torch.Tensor, alpha: float,
                 positions: PositionPolicy):
        super().__init__({site: adapter.lm_site(site)})
        if vector.shape != (adapter.hidden_size,):
            raise UserError(f"the steering vector has shape {tuple(vector.shape)}; site {site} has width "
                            f"{adapter.hidden_size}")
        self.delta = alpha * vector
        self.positions = positions
        self.seen = self.prompt_length = 0

    def on_output(self, site, output):
        states = _first(output)
        count = states.shape[1]
        if count > 1:  # a new sequence: its prompt pass
            self.seen, self.prompt_length = 0, count
        mask = self.positions.mask(self.seen, count, self.prompt_length).to(states.device)
        self.seen += count
        if not mask.any():
            return None
        steered = states + mask[None, :, None] * self.delta.to(states.device, states.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered
