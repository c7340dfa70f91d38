"""The vision tower: the input geometry and normalisation, the differentiable path from a
normalised image batch to the model's image inputs, and the tower's sites under canonical names
(`mimic_toolkit.sites`). The `mimic_vision_sites` hook's default filters `vision_sites`
(`mimic_toolkit/builtin.py`).
"""
from __future__ import annotations

import torch
from PIL import Image

from ..errors import UserError


class VisionTower:
    """The vision-tower part of `VLMAdapter`."""

    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_resample: int = Image.BICUBIC  # the filter the model's own processor resizes with

    # -- geometry and normalisation --------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    def use_resolution(self, side: int) -> None:
        """Choose this run's input side. The base accepts only the native resolution; adapters
        of models that take other sizes override this (and `resolution`)."""
        if side != self.resolution:
            raise UserError(f"resolution {side} is not supported: this model takes {self.resolution} px")

    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as [3, 1, 1] fp32 tensors on the model's device."""
        kw = dict(device=self.device, dtype=torch.float32)
        return (torch.tensor(self.image_mean, **kw).view(3, 1, 1),
                torch.tensor(self.image_std, **kw).view(3, 1, 1))

    def pixel_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid [0, 1] pixel range expressed in normalised space, per channel."""
        mean, std = self.normalisation()
        return (0 - mean) / std, (1 - mean) / std

    def normalise(self, pixels01: torch.Tensor) -> torch.Tensor:
        mean, std = self.normalisation()
        return (pixels01.to(mean.device) - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.normalisation()
        return (x * std + mean).clamp(0, 1)

    def preprocess(self, images: list[Image.Image], resolution: int | None = None) -> torch.Tensor:
        """Real images -> normalised [B, 3, R, R] as the model's processor prepares them: shortest
        side resized to R with the processor's filter, centre crop (inversion images are square),
        scaled to [0, 1], normalised."""
        side = resolution or self.resolution
        batch = [image_tensor(_resize_and_crop(image.convert("RGB"), side, self.image_resample)) for image in images]
        return self.normalise(torch.stack(batch))

    # -- model inputs (differentiable) -----------------------------------------------------
    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised fp32 images [B, 3, H, W] -> the model's image keyword arguments."""
        return {"pixel_values": images.to(self.dtype)}

    # -- sites -----------------------------------------------------------------------------
    @property
    def patch_embedding(self) -> torch.nn.Module:
        """The vision tower's patch embedding (its output: before any position embedding)."""
        raise NotImplementedError

    @property
    def vision_layers(self) -> list[torch.nn.Module]:
        """The vision tower's encoder layers, in order; each has an `mlp` and a `self_attn` (or `attn`)."""
        raise NotImplementedError

    def vision_sites(self) -> dict[str, torch.nn.Module]:
        """Every vision-tower site under its canonical name (`mimic_toolkit.sites`), built from
        `patch_embedding` and `vision_layers`; adapters of other layouts override this."""
        if type(self).feature_sites is not VisionTower.feature_sites:
            return self.feature_sites()  # an adapter written to the old contract names its sites itself
        sites = {"vision.patch_embedding": self.patch_embedding}
        for i, layer in enumerate(self.vision_layers):
            sites[f"vision.layers.{i}"] = layer
            sites[f"vision.layers.{i}.attn"] = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
            sites[f"vision.layers.{i}.mlp"] = layer.mlp
        return sites

    def feature_sites(self) -> dict[str, torch.nn.Module]:
        """The default sites of the feature statistics: the patch embedding and every layer's MLP.
        A run's own choice (`--feature-sites`) goes through the `mimic_vision_sites` hook."""
        from ..sites import select_sites

        return select_sites(self.vision_sites(), None)

    def site_tokens(self, site: str, output, batch_size: int) -> torch.Tensor:
        """A site's output -> [B, tokens, channels]. Handles [B, T, D] and conv maps [B, D, h, w];
        adapters with packed outputs (no batch dimension) override it."""
        if isinstance(output, tuple):
            output = output[0]
        if output.dim() == 4:
            return output.flatten(2).transpose(1, 2)
        return output

    def vision_forward(self, images: torch.Tensor) -> None:
        """Run only the vision tower on normalised images (what feature statistics need)."""
        raise NotImplementedError

    @property
    def projector(self) -> torch.nn.Module | None:
        """The module that maps the tower's output to the language model's width (LLaVA's
        `multi_modal_projector`); None where the adapter names none. Other layouts override this."""
        return getattr(getattr(self.model, "model", None), "multi_modal_projector", None)

    def image_sites(self) -> dict:
        """`vision.out`: the tower's output as the projector reads it (the projector's input);
        `projector.out`: the image tokens at the language model's width, before they are put among
        the text embeddings (`lm.embed`). `site_tokens` makes either [B, tokens, channels]."""
        from ..hooks import ModuleInput

        projector = self.projector
        return {} if projector is None else {"vision.out": ModuleInput(projector), "projector.out": projector}

    def image_token_grid(self) -> tuple[int, int, int] | None:
        """(rows, columns, first): from its `first` on, an image's tokens are a rows x columns
        grid over the image in raster order (what a latent's patch heatmap is drawn on). The
        default: one token per patch, after at most one class token. None: the tokens are not a
        grid (resampled); adapters whose tokens merge patches override this with their grid."""
        side = self.resolution // self.patch_size
        extra = self.image_token_count() - side * side
        return (side, side, extra) if extra in (0, 1) else None


def _resize_and_crop(image: Image.Image, side: int, resample: int) -> Image.Image:
    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((w, h), resample)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB picture -> [3, H, W] in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255


class EncoderTower:
    """The sites of transformers' CLIP- and SigLIP-style towers at `self.vision_tower` (LLaVA,
    Gemma 3, PaliGemma): `embeddings.patch_embedding` (its output is before the position
    embeddings), `encoder.layers`, and a forward on `pixel_values`. Put it before `VLMAdapter`."""

    @property
    def patch_embedding(self):
        return self.vision_tower.embeddings.patch_embedding

    @property
    def vision_layers(self):
        return self.vision_tower.encoder.layers

    def vision_forward(self, images: torch.Tensor) -> None:
        self.vision_tower(pixel_values=images.to(self.dtype))
