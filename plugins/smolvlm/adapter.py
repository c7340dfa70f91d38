"""The adapters for SmolVLM: `Idefics3ForConditionalGeneration` (HuggingFaceTB/SmolVLM-Instruct
layout) and `SmolVLMForConditionalGeneration` (SmolVLM2, HuggingFaceTB/SmolVLM2-500M-Video-Instruct
layout), which share the Idefics3 layout: a SigLIP tower, whose tokens a pixel shuffle packs
`scale_factor` x `scale_factor` into one before a linear projection, on a Llama decoder.

Idefics2's image input (`[B, n_images, 3, H, W]` with a pixel mask, one image per sample) and
tower sites, without the perceiver. For inversion, image splitting is off: the model sees only the
global view, which the processor (`do_image_splitting=False`) resizes to the tower's `image_size`.
Its patch conv reads only the whole patches of it: for SmolVLM-Instruct 27 x 27 patches of 14 px,
the top-left 378 of 384 px, and the model's output never depends on the other 6 px. So the
inversion optimises those 378 px (a border no gradient reaches would only fill with the priors'
noise), and real images are resized to 384 px and cropped to them, as the model reads them. The
tower takes no other size: the pixel shuffle and the prompt's `image_seq_len` assume the full grid.
"""
from __future__ import annotations

from PIL import Image

from mimic_plugins.idefics2.adapter import IMAGE_BOUNDARY, Idefics2Adapter
from mimic_toolkit.adapter import IMAGE_MARKER
from mimic_toolkit.errors import UserError
from mimic_toolkit.testing import BASIC_WORDS, word_tokenizer

GLOBAL_IMAGE = "<global-img>"

# SmolVLM's chat format for the processor's list contents ("<|im_start|>User:<image>question
# <end_of_utterance>\nAssistant: answer..."): a space after the colon unless the message opens with
# the image, which `user_content` decides; other roles' messages always have one.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['role'] != 'user' %} {% endif %}{{ message['content'] }}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class SmolVLMAdapter(Idefics2Adapter):
    model_class = "Idefics3ForConditionalGeneration"
    model_type = "idefics3"
    config_class = "Idefics3Config"
    image_resample = Image.LANCZOS  # Idefics3ImageProcessor's filter
    chat_template = SMOLVLM_TEMPLATE
    # the public checkpoint's tower, decoder, shuffle and image token (`architecture("full")`)
    full_vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14)
    full_text = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=64, vocab_size=49155, max_position_embeddings=16384,
                     rope_parameters={"rope_type": "default", "rope_theta": 273768.0})
    full_scale_factor, full_image_token_id = 3, 49153

    def __init__(self, model, tokenizer, spec=None):
        super().__init__(model, tokenizer, spec)
        self.side = self.max_resolution // self.patch_size * self.patch_size  # the pixels the patches cover

    def use_resolution(self, side: int) -> None:
        if side != self.side:
            raise UserError(f"SmolVLM takes {self.side} px (the patches of its {self.max_resolution} px view), "
                            f"not {side}")

    def preprocess(self, images: list[Image.Image], resolution: int | None = None):
        """As the processor resizes them (to the tower's `image_size`), cropped to the pixels its
        patches read."""
        side = resolution or self.side
        return super().preprocess(images, self.max_resolution)[..., :side, :side]

    def image_token_count(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // self.model.config.scale_factor ** 2

    def image_token_grid(self) -> tuple[int, int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size // self.model.config.scale_factor
        return side, side, 0  # one token per shuffled block of patches, in raster order

    def user_content(self, text: str, with_image: bool):
        if not with_image:
            return f" {text}"
        return f"{IMAGE_BOUNDARY}{GLOBAL_IMAGE}{IMAGE_MARKER}{IMAGE_BOUNDARY}{text}"  # the processor's, unsplit

    @classmethod
    def test_tokenizer(cls):
        specials = ["<|im_start|>", "<end_of_utterance>", "<|im_end|>", IMAGE_BOUNDARY, GLOBAL_IMAGE, "<image>"]
        return word_tokenizer(BASIC_WORDS + ["user", "assistant"], specials, SMOLVLM_TEMPLATE, bos="<|im_start|>",
                              eos="<end_of_utterance>", pad="<|im_end|>")

    @classmethod
    def architecture(cls, size: str):
        """full: the public checkpoint's; mid: the same tower geometry, shuffle and image-token
        count with narrow, shallow layers; tiny: SigLIP with 14 px patches on 60 px (56 read), a
        2 x 2 shuffle to 4 image tokens, a 2-layer Llama."""
        import transformers

        if size == "tiny":
            tokenizer = cls.test_tokenizer()
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=60, patch_size=14)  # 4 x 4 patches: like the real tower, 4 px unread
            text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                        pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)  # wider: the image counts
            scale_factor, image_token_id = 2, tokenizer.convert_tokens_to_ids("<image>")
        elif size == "mid":
            vision = dict(cls.full_vision, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2)
            text = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=8192)
            scale_factor, image_token_id = cls.full_scale_factor, 8100
        else:
            vision, text = cls.full_vision, cls.full_text
            scale_factor, image_token_id = cls.full_scale_factor, cls.full_image_token_id
        return getattr(transformers, cls.config_class)(
            vision_config=vision, text_config=dict(text, model_type="llama", rms_norm_eps=1e-5),
            scale_factor=scale_factor, image_token_id=image_token_id)


class SmolVLM2Adapter(SmolVLMAdapter):
    """SmolVLM2: the same layout under its own class (its processor also takes videos, unused here)."""

    model_class = "SmolVLMForConditionalGeneration"
    model_type = "smolvlm"
    config_class = "SmolVLMConfig"
    full_vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16)
    full_text = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                     num_key_value_heads=5, head_dim=64, vocab_size=49280, max_position_embeddings=8192,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    full_scale_factor, full_image_token_id = 4, 49190
