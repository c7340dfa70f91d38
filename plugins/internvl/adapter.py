"""The adapter for InternVL3 in transformers' own layout (`InternVLForConditionalGeneration`,
OpenGVLab/InternVL3-8B-hf; the original OpenGVLab/InternVL3-8B needs remote code and is not this).

InternViT-300M (CLS token, layer scale, 14 px patches at 448 px), a 2 x 2 pixel shuffle
(`downsample_ratio` 0.5) and an MLP projector, on Qwen2.5-7B. The processor can tile an image into
448 px crops plus a thumbnail (`crop_to_patches`); for inversion that is off, so the model sees one
448 px view, as the processor gives it with `crop_to_patches=False`: `<img>`, 256 context tokens,
`</img>`. The tower names its attention `attention`, so `vision_sites` says which module that is.
"""
from __future__ import annotations

import torch

from mimic_toolkit.adapter import IMAGE_MARKER, VLMAdapter
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternVL normalises with ImageNet's statistics
IMAGENET_STD = (0.229, 0.224, 0.225)

# The -hf checkpoints' ChatML for string contents (no default system turn).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class InternVLAdapter(VLMAdapter):
    model_class = "InternVLForConditionalGeneration"
    model_type = "internvl"
    image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD
    chat_template = INTERNVL_TEMPLATE

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    @property
    def resolution(self) -> int:
        return self.model.config.vision_config.image_size[0]  # [height, width] in this config

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size[0]

    def image_token_count(self) -> int:
        return int((self.resolution // self.patch_size) ** 2 * self.model.config.downsample_ratio ** 2)

    def image_token_grid(self) -> tuple[int, int, int]:
        side = int(self.resolution // self.patch_size * self.model.config.downsample_ratio)
        return side, side, 0  # one token per shuffled 2 x 2 block of patches, in raster order

    def user_content(self, text: str, with_image: bool):
        return f"<img>{IMAGE_MARKER}</img>\n{text}" if with_image else text  # as the processor expands it

    @property
    def patch_embedding(self):
        return self.vision_tower.embeddings.patch_embeddings  # before the CLS token and position embeddings

    @property
    def vision_layers(self):
        return self.vision_tower.encoder.layer  # 24 for InternViT-300M: 25 default feature sites

    def vision_sites(self) -> dict[str, torch.nn.Module]:
        sites = {"vision.patch_embedding": self.patch_embedding}
        for i, layer in enumerate(self.vision_layers):
            sites.update({f"vision.layers.{i}": layer, f"vision.layers.{i}.attn": layer.attention,
                          f"vision.layers.{i}.mlp": layer.mlp})
        return sites

    def vision_forward(self, images: torch.Tensor) -> None:
        self.vision_tower(pixel_values=images.to(self.dtype))

    @classmethod
    def test_tokenizer(cls):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
                    "system", "user", "assistant"]
        return word_tokenizer(BASIC_WORDS, specials, INTERNVL_TEMPLATE, bos=None, eos="<|im_end|>",
                              pad="<|endoftext|>")

    @classmethod
    def architecture(cls, size: str):
        """full: OpenGVLab/InternVL3-8B-hf (InternViT-300M at 448 px, Qwen2.5-7B with the checkpoint's
        151674-token vocabulary); mid: the same layout and 256 image tokens, narrow and shallow;
        tiny: 56 px with 14 px patches (4 image tokens), a 2-layer Qwen2 over the test tokenizer."""
        from transformers import InternVLConfig

        tokenizer = cls.test_tokenizer()
        vision, text, image_token_id = {
            "full": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                     dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768), 151667),
            "mid": (dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8192, max_position_embeddings=32768), 8100),
            "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=[56, 56]),
                     dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          initializer_range=0.1),  # wider: the image visibly moves the answer
                     tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")),
        }[size]
        side = vision.pop("image_size", [448, 448])
        return InternVLConfig(
            vision_config=dict(**vision, image_size=side, patch_size=[14, 14], hidden_act="gelu",
                               norm_type="layer_norm", layer_scale_init_value=0.1, use_mean_pooling=True,
                               attention_bias=True),  # InternViT-300M's qkv bias
            text_config=dict(**text, model_type="qwen2", rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
            image_token_id=image_token_id, image_seq_length=int((side[0] // 14) ** 2 / 4), downsample_ratio=0.5,
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
