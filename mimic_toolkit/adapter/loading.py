"""Loading: which transformers class a model is, reading a checkpoint from a folder or the hub and
writing one back, and the architectures of randomly initialised models (`architecture(size)`:
tiny ones for the tests, mid and full ones for the benchmarks). The `mimic_load_model` hook's
default calls `load` (`mimic_toolkit/builtin.py`).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError
from ..specs import AdapterSpec


class Loading:
    """The loading part of `VLMAdapter`."""

    model_class: str = ""  # transformers class name, e.g. "LlavaForConditionalGeneration"
    model_type: str = ""  # the checkpoint config's model_type, e.g. "llava"

    @classmethod
    def load(cls, checkpoint: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             device_map: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
             spec: AdapterSpec | None = None):
        """Load from a local folder or a hub id (the hub needs a network). With `device_map`
        ("auto"), accelerate places the layers over the visible devices instead of `device`."""
        import transformers
        from safetensors import SafetensorError

        _quiet_transformers()
        source = checkpoint_source(checkpoint)
        config = load_config(source, revision, trust_remote_code)
        if config.model_type != cls.model_type:
            raise UserError(f"'{checkpoint}' holds a {config.model_type} model, not {cls.model_type}; "
                            "choose the matching --model")
        _refuse_pickled_weights(source)
        model_cls = getattr(transformers, cls.model_class)
        try:  # safetensors only: a checkpoint's weights can never run code here
            with _transformers_silent():  # its load report would bury our one line
                model = model_cls.from_pretrained(source, config=config, dtype=dtype, revision=revision,
                                                  use_safetensors=True, trust_remote_code=trust_remote_code,
                                                  device_map=device_map)
        except (OSError, RuntimeError, ValueError) as exc:
            if "ignore_mismatched_sizes" in str(exc):
                raise UserError(f"the weights of '{checkpoint}' do not fit its config.json (tensors of other "
                                "shapes: another model size, or a config edited by hand)") from exc
            raise UserError(f"could not load the weights of '{checkpoint}': {_first_line(exc)}") from exc
        except SafetensorError as exc:
            raise UserError(f"the weights of '{checkpoint}' are damaged (truncated or not safetensors): "
                            f"{_first_line(exc)}") from exc
        try:
            tokenizer = cls.load_tokenizer(source, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"could not load the tokenizer of '{checkpoint}': {_first_line(exc)}") from exc
        return cls(model if device_map else model.to(device), tokenizer, spec=spec)

    @classmethod
    def load_tokenizer(cls, source: str, **kwargs):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, **kwargs)

    @classmethod
    def architecture(cls, size: str):
        """The transformers config of a randomly initialised model of this layout. "full": the
        public checkpoint's exact architecture (`benchmarks/`, `mimic models --sites`); "mid": the
        same layout and image-token count with narrow, shallow layers and a small vocabulary (seconds
        per step on a CPU); "tiny": a few hundred k parameters over `test_tokenizer`'s words (`tiny`)."""
        raise NotImplementedError(f"{cls.__name__} declares no architectures: "
                                  "implement the classmethod architecture(size)")

    @classmethod
    def test_tokenizer(cls):
        """The tiny architecture's in-memory tokenizer (`mimic_toolkit.testing.word_tokenizer`)."""
        raise NotImplementedError(f"{cls.__name__} declares no test tokenizer")

    @classmethod
    def tiny(cls, seed: int = 0):
        """A randomly initialised model of the "tiny" architecture with `test_tokenizer`, for CPU tests."""
        import transformers

        tokenizer, config = cls.test_tokenizer(), cls.architecture("tiny")
        torch.manual_seed(seed)
        adapter = cls(getattr(transformers, cls.model_class)(config), tokenizer)
        adapter.prepare_tiny()
        return adapter

    def prepare_tiny(self) -> None:
        """Adjust a just-built tiny model (its input side, wider random weights); by default nothing."""

    @classmethod
    def benchmark_config(cls, size: str):
        """The old name of `architecture`, kept for one release."""
        warnings.warn("benchmark_config(size) is now architecture(size)", DeprecationWarning, stacklevel=2)
        return cls.architecture(size)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "benchmark_config" in vars(cls) and "architecture" not in vars(cls):
            # written to the old contract: its architectures answer to the new name too
            cls.architecture = classmethod(lambda klass, size: klass.benchmark_config(size))

    def save(self, folder: str | os.PathLike) -> None:
        """Write a checkpoint folder that `load` reads back (used for tiny test checkpoints)."""
        _quiet_transformers()
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def _quiet_transformers() -> None:
    """No per-shard progress bars: our own panel reports progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def checkpoint_source(checkpoint: str) -> str:
    """A local model folder (its path) or a hub id; anything else is one clear error."""
    local = Path(checkpoint).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"'{checkpoint}' is not a model folder (it has no config.json)")
        return str(local)
    parts = checkpoint.split("/")
    if len(parts) == 2 and all(parts) and not checkpoint.startswith((".", "~")):
        return checkpoint
    raise UserError(f"checkpoint folder '{checkpoint}' does not exist")


@contextmanager
def _transformers_silent():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _refuse_pickled_weights(source: str) -> None:
    """A local folder holding only pickled weights (`*.bin`, `*.pt`) is refused: unpickling runs code."""
    local = Path(source)
    if local.is_dir() and not any(local.glob("*.safetensors")) and any(
            p.suffix in (".bin", ".pt", ".pth") for p in local.iterdir()):
        raise UserError(f"'{source}' holds only pickled weights, which are not loaded (they can run code); "
                        "convert them to safetensors (transformers: model.save_pretrained(folder))")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_config(source: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read the model config of '{source}': {str(exc).splitlines()[0]}") from exc
