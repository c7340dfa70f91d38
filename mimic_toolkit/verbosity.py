"""`mimic -v`: what the toolkit says beyond its results (what was loaded from where and how long
it took, and transformers' own messages), on standard error; silent unless turned on."""
from __future__ import annotations

import sys

_on = False


def configure(on: bool) -> None:
    """Set for each command (the CLI's root callback), so one verbose command leaves the next one,
    in the same process, as quiet as it asked to be."""
    global _on
    if on or _on:
        from transformers.utils import logging  # transformers' own messages (weights, configs) too

        logging.set_verbosity_info() if on else logging.set_verbosity_warning()
    _on = on


def say(message: str) -> None:
    if _on:
        print(message, file=sys.stderr, flush=True)
