"""The adapter for LLaVA-NeXT (`LlavaNextForConditionalGeneration`, llava-hf/llama3-llava-next-8b-hf).

AnyRes: LlavaNextImageProcessor cuts an image into tiles of the tower's side on the grid pinpoint
that fits it best, and puts a view of the whole image downscaled to one tile before them. For a
square image whose side is a square pinpoint nothing is resized or padded but that base view:
`pixel_inputs` builds the same crops from the normalised batch, differentiably (the base view with
PIL's antialiased bicubic filter in its two clipped passes; only its rounding to 8 bits is left out).
The model packs the tiles' features into one map, ends every row of it with its `image_newline`
embedding, and puts the base view's features first; `image_token_count` counts them as it does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mimic_plugins.llava_llama3.adapter import LLAMA3_TEMPLATE, LlavaLlama3Adapter
from mimic_toolkit.errors import UserError
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer


class LlavaNextAdapter(LlavaLlama3Adapter):
    model_class = "LlavaNextForConditionalGeneration"
    model_type = "llava_next"
    chat_template = LLAMA3_TEMPLATE  # llama3-llava-next's turns, for string contents

    def __init__(self, model, tokenizer, spec=None):
        super().__init__(model, tokenizer, spec)
        sides = self.square_sides()
        self.side = next((side for side in sides if side > self.tile), sides[0])  # the first that tiles

    # -- geometry ---------------------------------------------------------------------------
    @property
    def tile(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def resolution(self) -> int:
        return self.side

    def square_sides(self) -> list[int]:
        """The sides of the square grid pinpoints: images the processor tiles without resizing."""
        return sorted(h for h, w in self.model.config.image_grid_pinpoints if h == w)

    def use_resolution(self, side: int) -> None:
        if side not in self.square_sides():
            name = self.model_id or type(self).__name__
            raise UserError(f"{name} takes the square AnyRes grids {self.square_sides()} px, not {side}")
        self.side = side

    # -- model inputs -----------------------------------------------------------------------
    def crops(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + n * n, 3, t, t]: the base view, then the tiles row by row."""
        b, c, side, t = *images.shape[:3], self.tile
        base = images
        bounds = [(-m / s, (1 - m) / s) for m, s in zip(self.image_mean, self.image_std)]  # numbers: no device copy
        for size in [(side, t), (t, t)] if side != t else []:
            # PIL filters the rows, then the columns, and clips the filter's overshoot after each pass
            base = F.interpolate(base, size=size, mode="bicubic", antialias=True, align_corners=False)
            base = torch.stack([base[:, i].clamp(low, high) for i, (low, high) in enumerate(bounds)], dim=1)
        n = side // t
        tiles = images.reshape(b, c, n, t, n, t).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, t, t)
        return torch.cat([base.unsqueeze(1), tiles], dim=1)

    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # image_sizes stays on the host: the model reads it back as Python numbers every forward
        return {"pixel_values": self.crops(images).to(self.dtype),
                "image_sizes": torch.tensor([[images.shape[-2], images.shape[-1]]] * images.shape[0])}

    # -- prompts ----------------------------------------------------------------------------
    def packed_rows(self, rows: int) -> int:
        """Rows of the tiles' feature map as the LM gets them (LLaVA-NeXT: all)."""
        return rows

    def image_token_count(self) -> int:
        per_tile = self.tile // self.model.config.vision_config.patch_size
        rows = self.packed_rows(self.side // self.tile * per_tile)  # square: the processor unpads nothing
        return per_tile * per_tile + rows * (rows + 1)  # the base view, then each row and its newline

    # -- vision tower -----------------------------------------------------------------------
    def vision_forward(self, images: torch.Tensor) -> None:
        self.vision_tower(pixel_values=self.pixel_inputs(images)["pixel_values"].flatten(0, 1))

    def site_tokens(self, site: str, output, batch_size: int) -> torch.Tensor:
        """The tower runs on every crop of every image: [B * crops, T, D] -> [B, crops * T, D]."""
        tokens = super().site_tokens(site, output, batch_size)
        return tokens.reshape(batch_size, -1, tokens.shape[-1])

    @classmethod
    def test_tokenizer(cls):
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<image>", "<pad>", "user", "assistant"]
        return word_tokenizer(BASIC_WORDS, specials, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
                              pad="<pad>")

    @classmethod
    def architecture(cls, size: str):
        """LLaVA-Llama-3's towers and LMs (the same CLIP ViT-L/14-336 and Llama-3-8B) on the
        llava-hf/llama3-llava-next-8b-hf pinpoints (1 x 2, 2 x 1, 2 x 2, 3 x 1 and 1 x 3 tiles)."""
        from transformers import LlavaNextConfig

        llava = LlavaLlama3Adapter.architecture(size)
        text, tile = llava.text_config, llava.vision_config.image_size
        if size == "tiny":
            tokenizer = cls.test_tokenizer()
            text.vocab_size, text.pad_token_id = len(tokenizer), tokenizer.pad_token_id
            image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        else:
            image_token_id = {"full": 128256, "mid": 8100}[size]
        pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
        return LlavaNextConfig(vision_config=llava.vision_config, text_config=text, image_token_id=image_token_id,
                               image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", pad_token_id=text.pad_token_id)
