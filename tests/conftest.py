import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster on a busy machine


@pytest.fixture(scope="session")
def tiny_llava():
    """An in-memory random LLaVA-Llama-3-layout adapter (CLIP 32 px, patch 8, 2-layer Llama)."""
    from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter

    return LlavaLlama3Adapter.tiny()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_llava):
    """The tiny model saved as a checkpoint folder in the Intel/llava-llama-3-8b layout: no
    processor_config.json; the chat template comes with the tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava.save(folder)
    assert not (folder / "processor_config.json").exists()
    return folder


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
