"""The adapter for Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, Qwen/Qwen2.5-VL-7B-Instruct layout).

The model takes its image input, prompt and M-RoPE positions exactly as Qwen2-VL does (the same
image processor and chat format), so this is Qwen2-VL's adapter with another tower: RMSNorm
blocks with gated MLPs, most of which attend only within windows of 112 px (8 x 8 patches);
`fullatt_block_indexes` attend over the whole image. For the windows the tower reorders each
image's tokens window by window after the patch embedding; `site_tokens` puts every block's
output back in the processor's order (2 x 2 merge windows row by row, as `pixel_inputs` lays
out the patches), so a site's tokens mean the same patches at every site and in every image.
"""
from __future__ import annotations

import math

import torch

from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter
from mimic_toolkit.errors import UserError


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_class = "Qwen2_5_VLForConditionalGeneration"
    model_type = "qwen2_5_vl"

    def __init__(self, model, tokenizer, spec=None):
        super().__init__(model, tokenizer, spec)
        self._unwindowing = {}  # (batch size, patches per side, device) -> token order; computed once each

    def site_tokens(self, site: str, output, batch_size: int) -> torch.Tensor:
        """Packed [B * tokens, D] -> [B, tokens, D] in the processor's order. The windows never
        cross images, so each image's tokens stay in its own stretch of the packed sequence."""
        if site != "vision.patch_embedding":  # the blocks see the tokens window by window
            unit = self.vision_config.spatial_merge_size ** 2
            merged = site == "projector.out"  # the merger's output: one row per merge unit already
            side = math.isqrt(output.shape[0] // batch_size * (unit if merged else 1))  # patches per side of each image
            unit = 1 if merged else unit
            output = output.reshape(-1, unit, output.shape[-1])[self.unwindowing(batch_size, side, output.device)]
        return output.reshape(batch_size, -1, output.shape[-1])

    def unwindowing(self, batch_size: int, side: int, device) -> torch.Tensor:
        """The inverse of the tower's window order over merge units, for `batch_size` images of
        `side` x `side` patches, as the tower computes it."""
        from transformers.vision_utils import get_vision_window_index

        key = (batch_size, side, device)
        if key not in self._unwindowing:
            cfg = self.vision_config
            window_index, _ = get_vision_window_index(torch.tensor([[1, side, side]] * batch_size),
                                                      cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
            self._unwindowing[key] = torch.argsort(window_index).to(device)
        return self._unwindowing[key]

    def use_resolution(self, side: int) -> None:
        if side % self.merged_patch:
            raise UserError(f"Qwen2.5-VL takes sides that are multiples of {self.merged_patch} px, not {side}")
        self.side = side

    @classmethod
    def architecture(cls, size: str):
        """full: Qwen/Qwen2.5-VL-7B-Instruct; mid: the same layout (windows of 112 px, a
        full-attention block), narrow and shallow; tiny: the real patch geometry with tiny widths,
        run at 84 px (3 x 3 tokens) with 56 px windows, so the windows reorder the tokens and one
        is cut short by the image's edge."""
        from transformers import Qwen2_5_VLConfig

        tokenizer = cls.test_tokenizer()
        token = tokenizer.convert_tokens_to_ids
        vision, text, rope_section, image_token_id = {
            "full": (dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31]),
                     dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000),
                     [16, 24, 24], 151655),
            "mid": (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=112,
                         fullatt_block_indexes=[1]),
                    dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8192, bos_token_id=None, eos_token_id=None,
                         max_position_embeddings=32768), [4, 6, 6], 8100),
            "tiny": (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                          fullatt_block_indexes=[1]),
                     dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=token("<|im_end|>"),
                          initializer_range=0.1),  # as Qwen2-VL's tiny: wider, so the image counts
                     [2, 3, 3], None),
        }[size]
        # vision start, vision end, image and video tokens: the test tokenizer's, or the public checkpoint's
        names = ("vision_start", "vision_end", "image", "video")
        tokens = [token(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")] \
            if image_token_id is None else [image_token_id - 3, image_token_id - 2, image_token_id, image_token_id + 1]
        return Qwen2_5_VLConfig(
            vision_config=dict(**vision, out_hidden_size=text["hidden_size"], hidden_act="silu", patch_size=14,
                               temporal_patch_size=2, spatial_merge_size=2, tokens_per_second=2),
            text_config=dict(**text, rms_norm_eps=1e-6, rope_parameters={
                "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": rope_section}),
            **{f"{name}_token_id": token_id for name, token_id in zip(names, tokens)})

    def prepare_tiny(self) -> None:
        self.use_resolution(84)
