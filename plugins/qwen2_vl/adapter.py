"""The adapter for Qwen2-VL (`Qwen2VLForConditionalGeneration`, Qwen/Qwen2-VL-7B-Instruct layout).

Qwen's vision tower takes no [B, 3, H, W] batch: it wants every image cut into flattened patches,
all images packed into one sequence, plus `image_grid_thw`. `pixel_inputs` re-patchifies the
normalised batch exactly as Qwen2VLImageProcessor does, so gradients reach the pixels, and
`site_tokens` unpacks the tower's outputs per image again.
"""
from __future__ import annotations

import inspect

import torch

from mimic_toolkit.adapter import IMAGE_MARKER, VLMAdapter
from mimic_toolkit.errors import UserError
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer, words_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL normalises with OpenAI CLIP's statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# 448 px = 32 x 32 patches of 14 = 256 image tokens after the 2 x 2 merge (the benchmarks' size).
DEFAULT_RESOLUTION = 448
SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL-Instruct's ChatML format for string contents (the image is wrapped by user_content).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2VLAdapter(VLMAdapter):
    model_class = "Qwen2VLForConditionalGeneration"
    model_type = "qwen2_vl"
    image_mean, image_std = CLIP_MEAN, CLIP_STD
    chat_template = QWEN2_VL_TEMPLATE

    def __init__(self, model, tokenizer, spec=None):
        super().__init__(model, tokenizer, spec)
        self.side = (spec and spec.resolution) or DEFAULT_RESOLUTION  # a model trained at another side says so
        # newer transformers compute M-RoPE positions from token types (image = 1); older ones from input_ids
        self.wants_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    @property
    def visual(self):
        return self.model.model.visual

    @property
    def projector(self):
        return self.visual.merger  # merges 2x2 patches and projects them to the LM's width

    @property
    def vision_config(self):
        return self.model.config.vision_config

    # -- geometry ---------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.side

    @property
    def merged_patch(self) -> int:
        """Pixels per side of one LM image token (2 x 2 patches are merged into one)."""
        return self.vision_config.patch_size * self.vision_config.spatial_merge_size

    def use_resolution(self, side: int) -> None:
        if side % self.merged_patch:
            raise UserError(f"Qwen2-VL takes sides that are multiples of {self.merged_patch} px, not {side}")
        self.side = side

    # -- model inputs -----------------------------------------------------------------------
    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, H, W] -> Qwen's flattened patches [B * h * w, 3 * T * p * p], ordered like
        Qwen2VLImageProcessor: 2 x 2 merge windows row by row, the frame repeated T times."""
        cfg = self.vision_config
        p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
        b, c, height, width = images.shape
        h, w = height // p, width // p
        patches = images.reshape(b, c, h // m, m, p, w // m, m, p)
        patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # b, h/m, w/m, m, m, c, p, p
        patches = patches.unsqueeze(6).expand(*patches.shape[:6], t, p, p)  # a still image: one frame, T times
        return {"pixel_values": patches.reshape(b * h * w, c * t * p * p).to(self.dtype),
                "image_grid_thw": self.image_grid(b, h, w, images.device)}

    @staticmethod
    def image_grid(batch_size: int, h: int, w: int, device) -> torch.Tensor:
        """(frames, rows, columns) of patches per image, filled on the device: copying a host
        tensor to the GPU would make the host wait for the GPU every step."""
        grid = torch.empty(batch_size, 3, dtype=torch.long, device=device)
        grid[:, 0], grid[:, 1], grid[:, 2] = 1, h, w
        return grid

    def text_inputs(self, prompt, batch_size: int) -> dict[str, torch.Tensor]:
        inputs = super().text_inputs(prompt, batch_size)
        if self.wants_token_types:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        return inputs

    def padded_text_inputs(self, prompts) -> dict[str, torch.Tensor]:
        inputs = super().padded_text_inputs(prompts)
        if self.wants_token_types:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        return inputs

    def teacher_forcing_inputs(self, prompt, batch_size: int) -> dict[str, torch.Tensor]:
        """With the M-RoPE positions, which depend on the prompt alone: computed once here, they
        spare every step the forward's own computation, a Python loop of host reads."""
        inputs = super().teacher_forcing_inputs(prompt, batch_size)
        side = self.side // self.vision_config.patch_size
        token_types = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if self.wants_token_types else {}
        inputs["position_ids"], _ = self.model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=self.image_grid(batch_size, side, side, self.device), **token_types)
        return inputs

    # -- prompts ----------------------------------------------------------------------------
    def image_token_count(self) -> int:
        return (self.side // self.merged_patch) ** 2

    def image_token_grid(self) -> tuple[int, int, int]:
        side = self.side // self.merged_patch
        return side, side, 0  # one token per merged 2x2 block of patches, in raster order

    def user_content(self, text: str, with_image: bool):
        if not with_image:
            return text
        return f"<|vision_start|>{IMAGE_MARKER}<|vision_end|>{text}"  # as Qwen's processor writes it

    # -- vision tower -----------------------------------------------------------------------
    @property
    def patch_embedding(self):
        return self.visual.patch_embed  # no position embedding follows: Qwen's are rotary

    @property
    def vision_layers(self):
        return self.visual.blocks  # canonical names call them vision.layers.{i}

    def site_tokens(self, site: str, output, batch_size: int) -> torch.Tensor:
        """Packed [B * tokens, D] -> [B, tokens, D]: the images are equal in size and packed in order."""
        return output.reshape(batch_size, -1, output.shape[-1])

    def vision_forward(self, images: torch.Tensor) -> None:
        inputs = self.pixel_inputs(images)
        self.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

    @classmethod
    def test_tokenizer(cls):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>", "system", "user", "assistant"]
        return word_tokenizer(BASIC_WORDS + words_of(SYSTEM_PROMPT), specials, QWEN2_VL_TEMPLATE, bos=None,
                              eos="<|im_end|>", pad="<|endoftext|>")

    @classmethod
    def architecture(cls, size: str):
        """full: Qwen/Qwen2-VL-7B-Instruct; mid: the same layout (patch 14, temporal 2, 2 x 2 merge,
        M-RoPE), narrow and shallow; tiny: the real patch geometry with tiny widths, run at 56 px."""
        from transformers import Qwen2VLConfig

        if size == "tiny":
            tokenizer = cls.test_tokenizer()
            token = tokenizer.convert_tokens_to_ids
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                          temporal_patch_size=2, spatial_merge_size=2)
            text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=token("<|im_end|>"),
                        initializer_range=0.1)  # the merger's norm bounds the image tokens: at 0.02 they hardly count
            return Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=token("<|image_pad|>"),
                                 video_token_id=token("<|video_pad|>"),
                                 vision_start_token_id=token("<|vision_start|>"),
                                 vision_end_token_id=token("<|vision_end|>"))
        vision, text, rope_section, image_token_id = {
            "full": (dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584),
                     dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064), [16, 24, 24], 151655),
            "mid": (dict(depth=2, embed_dim=32, num_heads=2, hidden_size=128),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8192, bos_token_id=None, eos_token_id=None),
                    [4, 6, 6], 8100),
        }[size]
        return Qwen2VLConfig(
            vision_config=dict(**vision, mlp_ratio=4, patch_size=14, temporal_patch_size=2, spatial_merge_size=2),
            text_config=dict(**text, max_position_embeddings=32768, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                              "mrope_section": rope_section}),
            # vision start, vision end, image and video tokens in the public checkpoint's order
            vision_start_token_id=image_token_id - 3, vision_end_token_id=image_token_id - 2,
            image_token_id=image_token_id, video_token_id=image_token_id + 1)

    def prepare_tiny(self) -> None:
        self.use_resolution(56)  # 2 x 2 image tokens after the merge: a short prompt
