"""The adapter contract: everything the toolkit knows about one VLM lives in its adapter.

The core (inversion loop, statistics, CLI) only calls the adapter and never asks which model it
has. A new VLM is one `VLMAdapter` subclass plus an `AdapterSpec` registered by a plugin.
`VLMAdapter` is composed of parts, one module each, named after what the engine asks:

- `loading.py`: the transformers class, reading and writing checkpoints, and the architectures of
  random models: `architecture(size)`, `tiny` (`mimic_load_model`).
- `vision.py`: geometry, normalisation, pixel inputs and the tower's sites (`mimic_vision_sites`).
- `chat.py`: the chat template, image tokens and `Prompt` (`mimic_format_prompt`).
- `language.py`: text inputs, the target's logits, decoder sites, unembedding, generation.
- `memory.py`: what `--memory-saving` recomputes.

Most LLaVA-like models need only the class attributes, `patch_embedding`, `vision_layers`,
`vision_forward` (`EncoderTower` gives these three for CLIP- and SigLIP-style towers),
`image_token_count`, `architecture` and `test_tokenizer`; models whose image
input is not a plain [B, 3, H, W] batch override `pixel_inputs` (and `text_inputs` for extra
text-side inputs).
"""
from __future__ import annotations

import torch

from ..specs import AdapterSpec
from .chat import IGNORE_INDEX, IMAGE_MARKER, ChatFormat, Prompt
from .language import LanguageModel
from .loading import Loading, checkpoint_source, load_config
from .memory import MemorySaving
from .vision import EncoderTower, VisionTower

__all__ = ["EncoderTower", "IGNORE_INDEX", "IMAGE_MARKER", "Prompt", "VLMAdapter", "checkpoint_source", "load_config"]


class VLMAdapter(Loading, VisionTower, ChatFormat, LanguageModel, MemorySaving):
    """Base class of every model adapter. Subclasses set the class attributes and implement
    `patch_embedding`, `vision_layers`, `vision_forward`, `image_token_count`, `architecture` and
    `test_tokenizer` (the tokenizer of the tiny architecture)."""

    def __init__(self, model, tokenizer, spec: AdapterSpec | None = None):
        self.model = model.eval().requires_grad_(False)  # frozen: only the image is optimised
        self.tokenizer = tokenizer
        self.spec = spec
        self.registry = None  # the plugins it was loaded through (`engine.load_model`); None: the default
        self.checkpoint = None  # the folder or hub id it was loaded from
        self._step_inputs = None  # (prompt, batch size, inputs) of the last `target_logits`

    @property
    def model_id(self) -> str:
        """The id it was registered under ("" for an adapter built in code)."""
        return self.spec.id if self.spec else ""

    @property
    def device(self) -> torch.device:
        """Where images go: the device of the first layer (with a device map, the input's)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
