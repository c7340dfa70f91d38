"""The chat format: how chat turns and the image become the model's tokenised prompt (`Prompt`).
The `mimic_format_prompt` hook's default calls `build_prompt` (`mimic_toolkit/builtin.py`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UserError

IGNORE_INDEX = -100
IMAGE_MARKER = "\x00MIMIC_IMAGE\x00"  # stands in for the image while the chat template renders
QUERY_MARKER = "\x00MIMIC_QUERY\x00"  # marks where the last user message's content starts


@dataclass
class Prompt:
    """A tokenised chat with the image in the first user turn and the target answer last.

    input_ids / labels: [L]; labels are IGNORE_INDEX everywhere but on the target tokens.
    image_positions: indices of the image tokens in input_ids (of every image, in order).
    image_spans: (start, end) of each image's tokens, one per image, in order.
    query_start: where the last user message's content starts: a k-shot prompt and the zero-shot
    prompt of the same query share every token from there on.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_positions: torch.Tensor
    image_spans: tuple[tuple[int, int], ...] = ()
    query_start: int = 0

    def __post_init__(self):
        # computed once: the step must not read tensors back to the host
        self.target_ids = self.input_ids[self.labels != IGNORE_INDEX]
        self.n_target = len(self.target_ids)


class ChatFormat:
    """The chat-format part of `VLMAdapter`."""

    # The model's chat format as a Jinja template over string contents; None: the tokenizer's own.
    chat_template: str | None = None

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def image_token_count(self) -> int:
        raise NotImplementedError

    def image_placeholder_ids(self) -> list[int]:
        """The token ids that stand for one image in `input_ids`, already expanded."""
        return [self.image_token_id] * self.image_token_count()

    def user_content(self, text: str, with_image: bool):
        """A user message's content for the chat template (the image marker goes first). Formats
        that wrap the image in tokens, or put no newline after it, override this with IMAGE_MARKER."""
        return f"{IMAGE_MARKER}\n{text}" if with_image else text

    def build_prompt(self, turns: list[tuple[str, str]], target: bool = True, *, chat_template: str | None = None,
                     system: str | None = None, image_turns: tuple[int, ...] = (0,)) -> Prompt:
        """Chat turns [(user, assistant), ...] -> Prompt, in this adapter's chat template (or
        `chat_template`), after a `system` message if one is given. The image goes at the start of
        the first user message; the last assistant message is the target (no end-of-turn token
        after it). With `target=False` the last assistant message is left out: a prompt to generate
        from. `image_turns`: the turns whose user message starts with an image, one image each (in-context
        demonstrations with images: every turn; text demonstrations: only the last). The core asks
        for prompts through the `mimic_format_prompt` hook, whose default this is."""
        messages = [{"role": "system", "content": system}] if system else []
        for i, (user, assistant) in enumerate(turns):
            content = self.user_content(user, with_image=i in image_turns)
            messages.append({"role": "user", "content": QUERY_MARKER + content if i == len(turns) - 1 else content})
            if i < len(turns) - 1:
                messages.append({"role": "assistant", "content": assistant})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  chat_template=chat_template or self.chat_template)
        encode = lambda s: self.tokenizer(s, add_special_tokens=False).input_ids  # the template has BOS
        image = self.image_placeholder_ids()
        prompt_ids, spans, query_start = [], [], 0
        for piece in re.split(f"({re.escape(IMAGE_MARKER)}|{re.escape(QUERY_MARKER)})", text):
            if piece == IMAGE_MARKER:
                spans.append((len(prompt_ids), len(prompt_ids) + len(image)))
                prompt_ids += image
            elif piece == QUERY_MARKER:
                query_start = len(prompt_ids)
            else:
                prompt_ids += encode(piece)
        target_ids = encode(turns[-1][1]) if target else []
        if target and not target_ids:
            raise UserError("the target answer is empty")
        ids = torch.tensor(prompt_ids + target_ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[len(prompt_ids):] = ids[len(prompt_ids):]
        positions = torch.cat([torch.arange(start, end) for start, end in spans]) if spans else torch.zeros(0, dtype=torch.long)
        return Prompt(ids, labels, positions, tuple(spans), query_start)
