"""The adapter for LLaVA-1.5-style models (`LlavaForConditionalGeneration`: CLIP tower,
MLP projector, decoder LM) with a Llama-3 chat template, as Intel/llava-llama-3-8b ships it.

Intel's folder has no processor_config.json, so nothing here relies on the processor: the image
path is differentiable tensor code, and image tokens are expanded here, not by the processor.
"""
from __future__ import annotations

import torch

from mimic_toolkit.adapter import EncoderTower, VLMAdapter
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class LlavaLlama3Adapter(EncoderTower, VLMAdapter):  # CLIP ViT-L: 25 default sites
    model_class = "LlavaForConditionalGeneration"
    model_type = "llava"
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    def image_token_count(self) -> int:
        grid = self.resolution // self.patch_size
        keeps_cls = self.model.config.vision_feature_select_strategy == "full"
        return grid * grid + int(keeps_cls)

    @classmethod
    def test_tokenizer(cls):
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|reserved_special_token_0|>", "<pad>", "user", "assistant"]
        return word_tokenizer(BASIC_WORDS, specials, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
                              pad="<pad>")

    @classmethod
    def architecture(cls, size: str):
        """full: Intel/llava-llama-3-8b (CLIP ViT-L/14-336 with quick_gelu, Llama-3-8B with the
        checkpoint's 128320-token vocabulary); mid: the same layout, narrow and shallow; tiny: CLIP
        on 32 px with 8 px patches and a 2-layer Llama over the test tokenizer's words."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        if size == "tiny":
            tokenizer = cls.test_tokenizer()
            vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
                                      hidden_act="quick_gelu")
            text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                               pad_token_id=tokenizer.pad_token_id)
            return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                               vision_feature_select_strategy="default",
                               image_token_id=tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>"),
                               pad_token_id=tokenizer.pad_token_id)
        vision, text, image_token_id = {
            "full": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                     dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128320), 128257),
            "mid": (dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8192), 8100),
        }[size]
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**vision, image_size=336, patch_size=14, projection_dim=768,
                                           hidden_act="quick_gelu"),
            text_config=LlamaConfig(**text, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
            image_token_id=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default")

    def prepare_tiny(self) -> None:
        with torch.no_grad():  # larger random weights than HF's init, so the image visibly moves the answer
            for weight in self.model.parameters():
                if weight.dim() > 1:
                    weight.normal_(0, 0.1)
