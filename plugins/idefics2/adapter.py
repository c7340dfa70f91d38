"""The adapter for Idefics2 (`Idefics2ForConditionalGeneration`, HuggingFaceM4/idefics2-8b layout):
a SigLIP tower whose patch sequence a perceiver resampler compresses to 64 tokens per image, on
Mistral-7B.

The model takes images as [B, n_images, 3, H, W] with a pixel attention mask; here every sample
has one image, never split into crops, and the mask is all True. The model drops an image whose
pixels are all exactly 0 as padding: an optimised image never is.
"""
from __future__ import annotations

import torch
from PIL import Image

from mimic_toolkit.adapter import IMAGE_MARKER, VLMAdapter
from mimic_toolkit.errors import UserError
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# 378 px = 27 x 27 patches of 14: the smallest side the processor gives the model (it keeps sides in
# 378..980) and the grid SigLIP-so400m was pretrained on (384 px). The perceiver gives 64 tokens
# at any size, so larger sides only cost vision compute.
DEFAULT_RESOLUTION = 378
IMAGE_BOUNDARY = "<fake_token_around_image>"

# Idefics2's chat format ("User:<image>question<end_of_utterance>\nAssistant: answer..."; no space
# after the colon when the message opens with the image). Its tokenizer adds BOS: the template writes it.
IDEFICS2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if not message['content'].startswith('" + IMAGE_BOUNDARY + "') %} {% endif %}"
    "{{ message['content'] }}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class Idefics2Adapter(VLMAdapter):
    model_class = "Idefics2ForConditionalGeneration"
    model_type = "idefics2"
    image_mean, image_std = SIGLIP_MEAN, SIGLIP_STD
    image_resample = Image.BILINEAR  # Idefics2ImageProcessor's filter
    chat_template = IDEFICS2_TEMPLATE

    def __init__(self, model, tokenizer, spec=None):
        super().__init__(model, tokenizer, spec)
        self.side = min(DEFAULT_RESOLUTION, self.max_resolution)  # tiny towers are smaller than 378

    @property
    def vision_model(self):
        return self.model.model.vision_model

    @property
    def projector(self):
        return self.model.model.connector  # the modality projection and the perceiver resampler

    # -- geometry ---------------------------------------------------------------------------
    @property
    def max_resolution(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def resolution(self) -> int:
        return self.side

    def use_resolution(self, side: int) -> None:
        if side % self.patch_size or side > self.max_resolution:
            raise UserError(f"Idefics2 takes multiples of {self.patch_size} px up to {self.max_resolution}, not {side}")
        self.side = side

    # -- model inputs -----------------------------------------------------------------------
    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, height, width = images.shape
        mask = torch.ones(b, 1, height, width, dtype=torch.bool, device=images.device)
        return {"pixel_values": images.unsqueeze(1).to(self.dtype), "pixel_attention_mask": mask}

    # -- prompts ----------------------------------------------------------------------------
    def image_token_count(self) -> int:
        return self.model.config.perceiver_config.resampler_n_latents

    def user_content(self, text: str, with_image: bool):
        if not with_image:
            return text
        return f"{IMAGE_BOUNDARY}{IMAGE_MARKER}{IMAGE_BOUNDARY}{text}"  # as Idefics2's processor expands <image>

    # -- vision tower -----------------------------------------------------------------------
    @property
    def patch_embedding(self):
        return self.vision_model.embeddings.patch_embedding  # before SigLIP adds position embeddings

    @property
    def vision_layers(self):
        return self.vision_model.encoder.layers  # 27 for SigLIP-so400m: 28 default feature sites

    def vision_forward(self, images: torch.Tensor) -> None:
        self.vision_model(pixel_values=images.to(self.dtype))

    @classmethod
    def test_tokenizer(cls):
        specials = ["<s>", "</s>", IMAGE_BOUNDARY, "<image>", "<end_of_utterance>"]
        return word_tokenizer(BASIC_WORDS + ["user", "assistant"], specials, IDEFICS2_TEMPLATE, bos="<s>",
                              eos="</s>", pad="<unk>")

    @classmethod
    def architecture(cls, size: str):
        """full: HuggingFaceM4/idefics2-8b (SigLIP-so400m up to 980 px, a 3-layer perceiver with 64
        latents, Mistral-7B); mid: the same layout, narrow and shallow; tiny: SigLIP with 14 px
        patches on 56 px, a 1-layer perceiver with 4 latents, 2-layer Mistral."""
        from transformers import Idefics2Config

        if size == "tiny":
            tokenizer = cls.test_tokenizer()
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14)
            # Wider initialisations than the default 0.02: the perceiver's output norm bounds the image
            # tokens, and with narrow random weights the image hardly moves the answer.
            perceiver = dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                             resampler_head_dim=16, num_key_value_heads=1, initializer_range=0.5)
            text = dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
            return Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
        vision, perceiver, text = {
            "full": (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
                     dict(resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4),
                     dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=32003)),
            "mid": (dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                    dict(resampler_depth=1, resampler_n_heads=4, resampler_head_dim=32, num_key_value_heads=2),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8192)),
        }[size]
        return Idefics2Config(
            vision_config=dict(**vision, image_size=980, patch_size=14),
            perceiver_config=dict(**perceiver, hidden_size=text["hidden_size"], resampler_n_latents=64),
            text_config=dict(**text, model_type="mistral", max_position_embeddings=32768, rms_norm_eps=1e-5,
                             sliding_window=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            image_token_id={"full": 32001, "mid": 8100}[size])
