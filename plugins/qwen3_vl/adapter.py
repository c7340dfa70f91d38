"""The adapter for Qwen3-VL (`Qwen3VLForConditionalGeneration`, Qwen/Qwen3-VL-8B-Instruct layout).

The image input is Qwen2-VL's (flattened patches packed over the batch with `image_grid_thw`,
from the same image processor) with 16 px patches, 32 px per image token and SigLIP's
normalisation. The tower adds learned position embeddings, resampled to the image's grid, after
the patch embedding (whose output is the site, as for CLIP). DeepStack: the outputs of blocks
`deepstack_visual_indexes` are merged like the last block's and added to the image tokens'
hidden states after the first LM layers; the model's forward does that itself, so the answer's
gradient reaches the pixels through them too, and those blocks are ordinary vision sites.
"""
from __future__ import annotations

from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter
from mimic_toolkit.errors import UserError
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# 512 px = 32 x 32 patches of 16 = 256 image tokens after the 2 x 2 merge, as Qwen2-VL's 448 px.
DEFAULT_RESOLUTION = 512

# Qwen3-VL-Instruct's ChatML for string contents: unlike Qwen2-VL, no default system turn.
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_class = "Qwen3VLForConditionalGeneration"
    model_type = "qwen3_vl"
    image_mean, image_std = SIGLIP_MEAN, SIGLIP_STD
    chat_template = QWEN3_VL_TEMPLATE

    def __init__(self, model, tokenizer, spec=None):
        super().__init__(model, tokenizer, spec)
        self.side = (spec and spec.resolution) or DEFAULT_RESOLUTION

    def use_resolution(self, side: int) -> None:
        if side % self.merged_patch:
            raise UserError(f"Qwen3-VL takes sides that are multiples of {self.merged_patch} px, not {side}")
        self.side = side

    @classmethod
    def test_tokenizer(cls):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>", "system", "user", "assistant"]
        return word_tokenizer(BASIC_WORDS, specials, QWEN3_VL_TEMPLATE, bos=None, eos="<|im_end|>",
                              pad="<|endoftext|>")

    @classmethod
    def architecture(cls, size: str):
        """full: Qwen/Qwen3-VL-8B-Instruct (27 blocks, DeepStack from blocks 8, 16, 24; Qwen3-8B);
        mid: the same layout, narrow and shallow; tiny: the real patch geometry with tiny widths,
        DeepStack from block 0, run at 64 px (2 x 2 image tokens)."""
        from transformers import Qwen3VLConfig

        tokenizer = cls.test_tokenizer()
        token = tokenizer.convert_tokens_to_ids
        vision, text, rope_section, image_token_id = {
            "full": (dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                          num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
                     dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144),
                     [24, 20, 20], 151655),
            "mid": (dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=2304,
                         deepstack_visual_indexes=[0, 1]),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=8192, bos_token_id=None, eos_token_id=None,
                         max_position_embeddings=32768), [6, 5, 5], 8100),
            "tiny": (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16,
                          deepstack_visual_indexes=[0]),
                     dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=256,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=token("<|im_end|>"),
                          initializer_range=0.1),  # as Qwen2-VL's tiny: wider, so the image counts
                     [2, 3, 3], None),
        }[size]
        # vision start, vision end, image and video tokens: the test tokenizer's, or the public checkpoint's
        names = ("vision_start", "vision_end", "image", "video")
        tokens = [token(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")] \
            if image_token_id is None else [image_token_id - 3, image_token_id - 2, image_token_id, image_token_id + 1]
        return Qwen3VLConfig(
            vision_config=dict(**vision, out_hidden_size=text["hidden_size"], hidden_act="gelu_pytorch_tanh",
                               patch_size=16, temporal_patch_size=2, spatial_merge_size=2),
            text_config=dict(**text, rms_norm_eps=1e-6, rope_parameters={
                "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": rope_section,
                "mrope_interleaved": True}),
            **{f"{name}_token_id": token_id for name, token_id in zip(names, tokens)})

    def prepare_tiny(self) -> None:
        self.use_resolution(64)
