"""Inverting a direction inside the language model: `--objective concept:FILE:K`,
`neuron:lm.I:J` or `direction:FILE`. The image is optimised to maximise the projection of the
hidden state at one LM site onto a unit direction, averaged over a choice of positions:
- `last-prompt` (default): the last prompt token, the position that predicts the answer and has
  read every image token (the answer, if any, follows it and does not affect it);
- `image`: the mean over the image tokens.
The objective is the "lm" term of the inversion; priors and feature statistics stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import Prompt, VLMAdapter
from .errors import UserError

POSITIONS = ("last-prompt", "image")


@dataclass
class LMObjective:
    site: str
    direction: torch.Tensor  # [D], unit norm
    positions: torch.Tensor  # sequence positions averaged over

    def __call__(self, hidden: dict[str, torch.Tensor]) -> torch.Tensor:
        """Minus the mean projection (a loss), over the positions and the batch."""
        states = hidden[self.site][:, self.positions].float()
        return -(states @ self.direction).mean()


def parse_objective(text: str, adapter: VLMAdapter, model_id: str, prompt: Prompt,
                    positions: str = "last-prompt") -> LMObjective:
    kind, _, rest = text.partition(":")
    if kind == "concept":
        source, _, index = rest.rpartition(":")
        if not source or not index.isdigit():
            raise UserError(f"--objective concept:FILE:K needs a concept number K, got '{text}'")
        from .concepts import ConceptSet

        concepts = ConceptSet.load(source)
        check_model(concepts.meta, model_id, source)
        k = int(index)
        if k >= concepts.decomposition.k:
            raise UserError(f"'{source}' has concepts 0..{concepts.decomposition.k - 1}, not {k}")
        site, direction = concepts.meta["site"], concepts.decomposition.direction(k)
    elif kind == "neuron":
        site, _, unit = rest.rpartition(":")
        if not site or not unit.isdigit():
            raise UserError(f"--objective neuron:lm.I:J needs a site and a unit number, got '{text}'")
        if int(unit) >= adapter.hidden_size:
            raise UserError(f"site {site} has units 0..{adapter.hidden_size - 1}, not {unit}")
        direction = torch.zeros(adapter.hidden_size)
        direction[int(unit)] = 1.0
    elif kind == "direction":
        from .steer import load_vector

        vector, meta = load_vector(rest)
        check_model(meta, model_id, rest)
        site, direction = meta["site"], vector / vector.norm().clamp_min(1e-12)
    else:
        raise UserError(f"--objective must be concept:FILE:K, neuron:lm.I:J or direction:FILE, not '{text}'")
    adapter.lm_site(site)
    if direction.shape != (adapter.hidden_size,):
        raise UserError(f"--objective {text}: the direction has width {direction.shape[0]}, site {site} has "
                        f"{adapter.hidden_size}")
    if positions not in POSITIONS:
        raise UserError(f"objective positions must be {' or '.join(POSITIONS)}, not '{positions}'")
    chosen = prompt.image_positions if positions == "image" else \
        torch.tensor([len(prompt.input_ids) - prompt.n_target - 1])
    return LMObjective(site, direction.to(adapter.device), chosen.to(adapter.device))


def check_model(meta: dict, model_id: str, source: str) -> None:
    """Refuse a concepts or vector file made with another model."""
    if meta.get("model") != model_id:
        raise UserError(f"'{source}' was made with model '{meta.get('model')}', not '{model_id}'")
