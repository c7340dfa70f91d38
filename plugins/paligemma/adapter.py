"""The adapter for PaliGemma 2 (`PaliGemmaForConditionalGeneration`, google/paligemma2-3b-pt-224).

PaliGemmaProcessor writes "<image> x 256, <bos>, prompt, \\n" and then the answer; `token_type_ids`
0 there and 1 on the answer make the attention prefix-LM: the image and prompt attend to each
other both ways, the answer causally. A pretrained ("pt") model has no chat format: a later turn
follows the previous answer after a newline. Gemma 2 caps its logits (30 tanh(x / 30)).
"""
from __future__ import annotations

import torch

from mimic_toolkit.adapter import IGNORE_INDEX, IMAGE_MARKER, EncoderTower, VLMAdapter
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('PaliGemma takes no system prompt') }}{% endif %}{{ message['content'] }}\n{% endfor %}"
)


class PaliGemmaAdapter(EncoderTower, VLMAdapter):
    model_class = "PaliGemmaForConditionalGeneration"
    model_type = "paligemma"
    chat_template = PALIGEMMA_TEMPLATE  # SigLIP's mean and std, bicubic: the base's

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    def image_token_count(self) -> int:
        return (self.resolution // self.patch_size) ** 2

    def user_content(self, text: str, with_image: bool):
        return f"{IMAGE_MARKER}{self.tokenizer.bos_token}{text}" if with_image else text

    def text_inputs(self, prompt, batch_size: int) -> dict[str, torch.Tensor]:
        inputs = super().text_inputs(prompt, batch_size)
        types = self.token_types([prompt], inputs["input_ids"].shape[1])
        return {**inputs, "token_type_ids": types.expand(batch_size, -1)}

    def padded_text_inputs(self, prompts) -> dict[str, torch.Tensor]:
        inputs = super().padded_text_inputs(prompts)
        return {**inputs, "token_type_ids": self.token_types(prompts, inputs["input_ids"].shape[1])}

    def token_types(self, prompts, length: int) -> torch.Tensor:
        """0 on each prompt's prefix (everything before its answer), 1 on the answer and padding."""
        types = torch.ones(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            types[row, :len(prompt.input_ids)] = (prompt.labels != IGNORE_INDEX).long()
        return types.to(self.device)

    def unembed(self, hidden: torch.Tensor, apply_final_norm: bool = True) -> torch.Tensor:
        logits, cap = super().unembed(hidden, apply_final_norm), self.model.config.text_config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @classmethod
    def test_tokenizer(cls):
        specials = ["<bos>", "<eos>", "<pad>", "<image>"]
        return word_tokenizer(BASIC_WORDS, specials, PALIGEMMA_TEMPLATE, bos="<bos>", eos="<eos>", pad="<pad>")

    @classmethod
    def architecture(cls, size: str):
        """full: google/paligemma2-3b-pt-224 (SigLIP-so400m at 224 px, Gemma-2-2B: 26 layers, soft-capped
        attention and logits); mid: narrow and shallow; tiny: SigLIP on 32 px of 8 px patches, 2 layers."""
        from transformers import PaliGemmaConfig

        vision, text, image_token_id = cls.tiny_architecture() if size == "tiny" else {
            "full": (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          image_size=224, patch_size=14),
                     dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                          vocab_size=257216, pad_token_id=0, bos_token_id=2, eos_token_id=1), 257152),
            "mid": (dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         image_size=224, patch_size=14),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=4096,
                         vocab_size=8192, pad_token_id=0, bos_token_id=2, eos_token_id=1), 8100),
        }[size]
        return PaliGemmaConfig(
            vision_config=dict(**vision, model_type="siglip_vision_model", vision_use_head=False),
            text_config=dict(**text, model_type="gemma2", max_position_embeddings=8192, attn_logit_softcapping=50.0,
                             final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
            image_token_id=image_token_id, projection_dim=text["hidden_size"], hidden_size=text["hidden_size"],
            pad_token_id=text["pad_token_id"], bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"])

    @classmethod
    def tiny_architecture(cls):
        """(vision, text, image token id) of the tiny size, over the test tokenizer."""
        tokenizer = cls.test_tokenizer()
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                      patch_size=8)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                    vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        return vision, text, tokenizer.convert_tokens_to_ids("<image>")
