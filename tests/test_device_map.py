"""A model spread over devices by accelerate (`--device-map auto` on several GPUs) inverts with the
same gradient. No second GPU here: the second "device" is accelerate's disk offload, which puts
the same hooks on the modules (weights moved in for each forward) as a multi-GPU split does."""
import pytest
import torch
import transformers

from mimic_toolkit.config import resolve
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.terms import BUILTIN_TERMS

# half the language model, the final norm and the head live "elsewhere"
DEVICE_MAP = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
              "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
              "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
              "model.language_model.norm": "disk", "lm_head": "disk"}
TERMS = {spec.name: spec.term for spec in BUILTIN_TERMS}


@pytest.fixture(scope="module")
def spread_llava(tiny_checkpoint, tiny_llava, tmp_path_factory):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoint, device_map=DEVICE_MAP, offload_folder=tmp_path_factory.mktemp("offload"),
        dtype=torch.float32)
    return type(tiny_llava)(model, tiny_llava.tokenizer)


def one_step_gradient(adapter, memory_saving):
    config = resolve([dict(iterations=1, batch_size=2, resolution=32, jitter=0, flip=False,
                           memory_saving=memory_saving)])
    prompt = adapter.build_prompt([("What is in the image?", "a red circle")])
    terms = [ActiveTerm("main", TERMS["main"], 1.0), ActiveTerm("tv_l2", TERMS["tv_l2"], 0.1)]
    with Inversion(adapter, prompt, config, terms) as inversion:
        loss, _, _ = inversion.objective(inversion.images)
        loss.backward()
        return loss.detach(), inversion.images.grad


@pytest.mark.parametrize("memory_saving", ["off", "selective"])
def test_a_model_spread_by_a_device_map_gives_the_same_loss_and_gradient(spread_llava, tiny_llava, memory_saving):
    offloaded = spread_llava.model.model.language_model.layers[1].mlp
    accelerate_forward = vars(offloaded)["forward"]  # accelerate's hook, which moves the weights in
    assert offloaded.down_proj.weight.device.type == "meta"  # the weights really are elsewhere
    loss, grad = one_step_gradient(tiny_llava, "off")
    spread_loss, spread_grad = one_step_gradient(spread_llava, memory_saving)
    assert torch.allclose(loss, spread_loss) and torch.allclose(grad, spread_grad, atol=1e-6)
    assert vars(offloaded)["forward"] is accelerate_forward  # recomputation undone, accelerate's hook kept
