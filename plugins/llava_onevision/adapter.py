"""The adapter for LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`,
llava-hf/llava-onevision-qwen2-7b-ov-hf): LLaVA-NeXT's AnyRes tiling (`LlavaNextAdapter`) with a
SigLIP tower at 384 px, on Qwen2. AnyRes-max: a tile feature map of more than 9 tiles' tokens is
shrunk (bilinearly, by the model) to about that many, which `packed_rows` counts.

SigLIP's 14 px patches cover 378 of each tile's 384 px (the last 6 are cut off), so the patch
grid is not periodic over the image: `patch_size` is the tile, the unit sides are multiples of.
"""
from __future__ import annotations

import math

from mimic_plugins.llava_next.adapter import LlavaNextAdapter
from mimic_toolkit.adapter import IMAGE_MARKER
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # the checkpoint's preprocessor_config.json

# llava-onevision's ChatML for string contents: a space after the role, the image before the text
# ("<|im_start|>user <image>\nWhat...<|im_end|>"); no system turn unless one is given.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['role'] != 'user' %}\n{% endif %}{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_class = "LlavaOnevisionForConditionalGeneration"
    model_type = "llava_onevision"
    image_mean, image_std = SIGLIP_MEAN, SIGLIP_STD
    chat_template = ONEVISION_TEMPLATE

    @property
    def patch_size(self) -> int:
        return self.tile

    def packed_rows(self, rows: int) -> int:
        per_tile = self.tile // self.model.config.vision_config.patch_size
        max_tiles = int(self.model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * rows / (max_tiles * per_tile ** 2))  # the model's own expression, to the last bit
        return int(rows // ratio) if ratio > 1.1 else rows

    def user_content(self, text: str, with_image: bool):
        return f"{IMAGE_MARKER}\n{text}" if with_image else f"\n{text}"

    @classmethod
    def test_tokenizer(cls):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "system", "user",
                    "assistant"]
        return word_tokenizer(BASIC_WORDS, specials, ONEVISION_TEMPLATE, bos=None, eos="<|im_end|>",
                              pad="<|endoftext|>")

    @classmethod
    def architecture(cls, size: str):
        """full: llava-hf/llava-onevision-qwen2-7b-ov-hf (SigLIP-so400m, 26 layers, at 384 px;
        pinpoints of 1 to 6 tiles a side; Qwen2-7B); mid: the same layout, narrow and shallow;
        tiny: SigLIP on 30 px tiles of 8 px patches (a remainder cut off, as at 384 / 14)."""
        from transformers import LlavaOnevisionConfig

        if size == "tiny":
            tokenizer = cls.test_tokenizer()
            token = tokenizer.convert_tokens_to_ids
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=30, patch_size=8)
            text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=None, eos_token_id=token("<|im_end|>"))
            image_token_id, video_token_id = token("<image>"), token("<video>")
        else:
            vision, text, image_token_id = {
                "full": (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
                         dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, vocab_size=152128), 151646),
                "mid": (dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                        dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=8192), 8100),
            }[size]
            vision.update(image_size=384, patch_size=14)
            video_token_id = image_token_id + 1
        text.update(max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        tile = vision["image_size"]
        pinpoints = [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]
        return LlavaOnevisionConfig(
            vision_config=dict(**vision, model_type="siglip_vision_model", vision_use_head=False),
            text_config=dict(**text, model_type="qwen2"), image_token_id=image_token_id,
            video_token_id=video_token_id, image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
