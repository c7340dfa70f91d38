"""`mimic -v`: what the toolkit says beyond its results (the resolved settings, what was loaded
from where and how long it took), on standard error; silent unless turned on."""
from __future__ import annotations

import sys

_on = False


def turn_on() -> None:
    global _on
    _on = True
    from transformers.utils import logging  # transformers' own messages (weights, configs) too

    logging.set_verbosity_info()


def say(message: str) -> None:
    if _on:
        print(message, file=sys.stderr, flush=True)
