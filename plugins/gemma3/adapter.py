"""The adapter for Gemma 3 (`Gemma3ForConditionalGeneration`, google/gemma-3-4b-it): SigLIP at
896 px, its 64 x 64 patches average-pooled to 256 soft tokens, which Gemma3Processor wraps as
"\\n\\n<start_of_image>[256 soft tokens]<end_of_image>\\n\\n". Pan-and-scan (extra crops of wide
images) is off, as in the processor's default: one square image, resized to 896 px and no more.
The soft tokens attend to each other both ways: `token_type_ids` marks them, as the processor does."""
from __future__ import annotations

import torch
from PIL import Image

from mimic_toolkit.adapter import IMAGE_MARKER, EncoderTower, VLMAdapter
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

# Gemma 3's turns for string contents; a system message is put before the first user message.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% set prefix = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ prefix if loop.first else '' }}"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma3Adapter(EncoderTower, VLMAdapter):
    model_class = "Gemma3ForConditionalGeneration"
    model_type = "gemma3"
    image_resample = Image.BILINEAR  # Gemma3ImageProcessor's; mean and std are the base's 0.5
    chat_template = GEMMA3_TEMPLATE

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    def image_token_count(self) -> int:
        return self.model.config.mm_tokens_per_image

    def image_token_grid(self) -> tuple[int, int, int]:
        side = round(self.image_token_count() ** 0.5)  # the patches average-pooled in raster order
        return side, side, 0

    def user_content(self, text: str, with_image: bool):
        return f"\n\n<start_of_image>{IMAGE_MARKER}<end_of_image>\n\n{text}" if with_image else text

    def text_inputs(self, prompt, batch_size: int) -> dict[str, torch.Tensor]:
        return self.with_token_types(super().text_inputs(prompt, batch_size))

    def padded_text_inputs(self, prompts) -> dict[str, torch.Tensor]:
        return self.with_token_types(super().padded_text_inputs(prompts))

    def with_token_types(self, inputs: dict) -> dict[str, torch.Tensor]:
        return {**inputs, "token_type_ids": (inputs["input_ids"] == self.image_token_id).long()}

    @classmethod
    def test_tokenizer(cls):
        specials = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                    "<end_of_image>", "<image_soft_token>", "user", "model"]
        return word_tokenizer(BASIC_WORDS, specials, GEMMA3_TEMPLATE, bos="<bos>", eos="<end_of_turn>", pad="<pad>")

    @classmethod
    def architecture(cls, size: str):
        """full: google/gemma-3-4b-it (SigLIP-so400m at 896 px, Gemma-3-4B: 34 layers, 5 sliding to
        1 global); mid: narrow and shallow; tiny: SigLIP on 64 px of 8 px patches pooled 4 x 4 to 4
        tokens (the real kernel), a sliding and a global layer."""
        from transformers import Gemma3Config

        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        if size == "tiny":
            tokenizer = cls.test_tokenizer()
            token = tokenizer.convert_tokens_to_ids
            return Gemma3Config(
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=64, patch_size=8, vision_use_head=False),
                text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                 layer_types=["sliding_attention", "full_attention"], vocab_size=len(tokenizer),
                                 max_position_embeddings=512, rope_parameters=rope, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=token("<bos>"), eos_token_id=token("<end_of_turn>")),
                mm_tokens_per_image=4, image_token_id=token("<image_soft_token>"),
                boi_token_id=token("<start_of_image>"), eoi_token_id=token("<end_of_image>"))
        vision, text, (image, begin, end) = {
            "full": (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
                     dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=262208),
                     (262144, 255999, 256000)),
            "mid": (dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, vocab_size=8192),
                    (8100, 8101, 8102)),
        }[size]
        return Gemma3Config(
            vision_config=dict(**vision, image_size=896, patch_size=14, vision_use_head=False),
            text_config=dict(**text, sliding_window=1024, max_position_embeddings=131072, rope_parameters=rope),
            mm_tokens_per_image=256, image_token_id=image, boi_token_id=begin, eoi_token_id=end)

    def prepare_tiny(self) -> None:
        with torch.no_grad():  # Gemma 3 initialises the image projection to zeros: the image would not count
            self.model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.1)
