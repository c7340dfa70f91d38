"""Memory saving: which blocks the backward pass recomputes instead of keeping their activations
(`--memory-saving selective|layers`). No hook: the inversion enters `activation_checkpointing`.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint


class MemorySaving:
    """The memory-saving part of `VLMAdapter`."""

    # the attributes of each language-model layer that hold its norms (Llama, Mistral and Qwen2 names)
    recomputed_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")

    @contextmanager
    def activation_checkpointing(self, level: str):
        """Recompute activations in the backward pass instead of keeping them, while inside.
        "selective": the modules of `selectively_recomputed`, which keep most of the memory and
        cost little to recompute. "layers": whole layers (transformers' gradient checkpointing, which
        acts only on layers in training mode: with frozen weights and no dropout nothing else
        changes). "off": nothing. The gradient is the same in every level."""
        if level == "layers":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module.train()
        blocks = self.selectively_recomputed() if level == "selective" else []
        own_forwards = [block.__dict__.get("forward") for block in blocks]  # accelerate's device hooks live there
        for block in blocks:
            # eval mode has no randomness to replay, so the RNG state is not saved per call
            block.forward = partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)
        try:
            yield
        finally:
            for block, forward in zip(blocks, own_forwards):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward
            if level == "layers":  # transformers 5.24 renamed the switch; 5.17 has only the old name
                (getattr(self.model, "activation_checkpointing_disable", None)
                 or self.model.gradient_checkpointing_disable)()
                self.model.eval()

    def selectively_recomputed(self) -> list[torch.nn.Module]:
        """What `activation_checkpointing("selective")` recomputes. Every vision-tower and
        language-model layer's `mlp`: their wide hidden activations are most of what a frozen model
        keeps, for two of a layer's matmuls. And the language model's norms named in
        `recomputed_norms`, RMSNorms that keep an fp32 copy of their input: recomputed, they keep
        only the input itself, for a few elementwise operations. Other layouts override this."""
        lm_layers = list(self.language_model.layers)
        # the vision MLPs by their site names: an adapter of the old contract names them itself
        vision_mlps = [module for name, module in self.vision_sites().items() if name.endswith(".mlp")]
        return vision_mlps + [layer.mlp for layer in lm_layers] + \
            [getattr(layer, name) for layer in lm_layers for name in self.recomputed_norms]
