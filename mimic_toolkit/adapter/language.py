"""The language model: the text-side inputs, the logits of the target answer that the inversion
optimises, and the decoder's sites, unembedding and greedy generation (LM recording, steering,
captions). No hook: the core calls these directly.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .chat import Prompt


class LanguageModel:
    """The language-model part of `VLMAdapter`."""

    # -- model inputs (differentiable) -----------------------------------------------------
    def text_inputs(self, prompt: Prompt, batch_size: int) -> dict[str, torch.Tensor]:
        """The prompt's keyword arguments for a batch of `batch_size` images."""
        ids = prompt.input_ids.to(self.device).unsqueeze(0).expand(batch_size, -1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def padded_text_inputs(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Prompts of different lengths in one batch, one image set each, right-padded so that every
        prompt keeps its positions (in-context demonstrations): input_ids and attention_mask [B, L]."""
        length = max(len(p.input_ids) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt.input_ids)], mask[row, :len(prompt.input_ids)] = prompt.input_ids, 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def teacher_forcing_inputs(self, prompt: Prompt, batch_size: int) -> dict[str, torch.Tensor]:
        """The text-side inputs of `target_logits`: `text_inputs` without the all-ones attention
        mask (with no padding the causal mask alone is the same, and transformers would read an
        explicit one back to the host every step). Adapters add inputs only this forward takes."""
        return {**self.text_inputs(prompt, batch_size), "attention_mask": None}

    def target_logits(self, images: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """Logits that predict each target token, [B, n_target, vocab], fp32. Only these
        positions go through the LM head (the target is the end of the sequence)."""
        n = prompt.n_target
        out = self.model(**self.pixel_inputs(images), **self._teacher_forcing_inputs_once(prompt, images.shape[0]),
                         logits_to_keep=n + 1, use_cache=False)
        return out.logits[:, :-1].float()

    @torch.compiler.disable  # a compiled step would otherwise be recompiled once the cache is filled
    def _teacher_forcing_inputs_once(self, prompt: Prompt, batch_size: int) -> dict[str, torch.Tensor]:
        """Built on the first step and reused: copying the prompt to the GPU every step would make
        the host wait for the GPU."""
        cached = self._step_inputs
        if cached is None or cached[0] is not prompt or cached[1] != batch_size:
            self._step_inputs = cached = (prompt, batch_size, self.teacher_forcing_inputs(prompt, batch_size))
        return cached[2]

    @torch.no_grad()
    def answer_probability(self, images: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """P(the prompt's target | image) per normalised image: the product over its tokens, [B]."""
        logp = self.target_logits(images, prompt).log_softmax(-1)
        targets = prompt.target_ids.to(logp.device).expand(len(images), -1)
        return logp.gather(-1, targets[..., None]).sum((1, 2)).exp()

    # -- decoder sites, unembedding, generation -------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, `layers`, final `norm`). transformers' `get_decoder`
        finds it in every layout we support; adapters of other layouts override this."""
        return self.model.get_decoder()

    def lm_sites(self) -> dict[str, torch.nn.Module]:
        """Named language-model sites: `lm.{i}` (residual stream after decoder layer i),
        `lm.{i}.attn` and `lm.{i}.mlp` (the branch outputs, before the residual add), `lm.{i}.heads`
        (the attention heads' outputs, the input of `o_proj`) and
        `lm.final_norm`, and `lm.embed`: the first layer's input, the text embeddings with the
        projected image features in place. Adapters whose layers name their branches otherwise
        override this."""
        from ..hooks import ModuleInput

        sites = {"lm.embed": ModuleInput(self.language_model.layers[0])}
        for i, layer in enumerate(self.language_model.layers):
            sites[f"lm.{i}"] = layer
            sites[f"lm.{i}.attn"] = layer.self_attn
            sites[f"lm.{i}.mlp"] = layer.mlp
            if hasattr(layer.self_attn, "o_proj"):  # every head's output, [B, T, H * d_head]: view as [B, T, H, d_head]
                sites[f"lm.{i}.heads"] = ModuleInput(layer.self_attn.o_proj, "input")
        sites["lm.final_norm"] = self.language_model.norm
        return sites

    def lm_site(self, name: str) -> torch.nn.Module:
        sites = self.lm_sites()
        if name not in sites:
            last = len(self.language_model.layers) - 1
            raise UserError(f"this model has no site '{name}' (sites: lm.embed, lm.0 .. lm.{last}, lm.I.attn, "
                            "lm.I.mlp, lm.I.heads, lm.final_norm)")
        return sites[name]

    @property
    def hidden_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[1]

    def unembed(self, hidden: torch.Tensor, apply_final_norm: bool = True) -> torch.Tensor:
        """Hidden states [..., D] -> fp32 logits [..., vocab] through the LM head, after the
        final norm unless `apply_final_norm` is False (states taken after that norm)."""
        head = self.model.get_output_embeddings()
        hidden = hidden.to(head.weight.device, head.weight.dtype)
        if apply_final_norm:
            hidden = self.language_model.norm(hidden)
        return head(hidden).float()

    def end_token_ids(self) -> list[int]:
        """Tokens that end an answer: the tokenizer's end token and the model's own."""
        ends = self.model.generation_config.eos_token_id
        ends = ends if isinstance(ends, list) else [ends]
        return sorted({i for i in [self.tokenizer.eos_token_id, *ends] if i is not None})

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt: Prompt, max_new_tokens: int) -> torch.Tensor:
        """Greedy answers for a batch of normalised images with one shared prompt: the new
        token ids [B, T] (rows that ended early are padded)."""
        out = self._generate(images, prompt, max_new_tokens=max_new_tokens, do_sample=False)
        return out[:, len(prompt.input_ids):]

    def top_answers(self, images: torch.Tensor, prompt: Prompt, k: int,
                    max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most probable answers per image (beam search, k beams, no length penalty) and the
        probability of each, its end token included: ids [B, k, T] and P [B, k]. k = 1 searches
        two beams: with one, generate is greedy and reports no sequence scores."""
        out = self._generate(images, prompt, max_new_tokens=max_new_tokens, do_sample=False, num_beams=max(k, 2),
                             num_return_sequences=k, length_penalty=0.0, early_stopping=True,
                             output_scores=True, return_dict_in_generate=True)
        b = images.shape[0]
        return out.sequences[:, len(prompt.input_ids):].reshape(b, k, -1), out.sequences_scores.exp().reshape(b, k)

    def _generate(self, images: torch.Tensor, prompt: Prompt, **settings):
        from transformers import GenerationConfig

        ends = self.end_token_ids()
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(eos_token_id=ends, pad_token_id=ends[0] if pad is None else pad, **settings)
        return self.model.generate(**self.pixel_inputs(images), **self.text_inputs(prompt, images.shape[0]),
                                   generation_config=config)
