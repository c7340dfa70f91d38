"""Steering: the position policies by hand, steering inside a real generation (prompt pass and
generated tokens), mean-difference vectors, vector files and refusals."""
import pytest
import torch

from mimic_toolkit.lm_capture import load_samples
from mimic_toolkit.errors import UserError
from mimic_toolkit.lm import LMRecorder, PositionPolicy, Steering
from mimic_toolkit.steer import build_vector, load_vector, save_vector, steer_answers

from lm_helpers import colour_images, write_features


class OneModule:
    """An adapter stand-in whose every site is one identity module of width 2."""

    hidden_size = 2

    def __init__(self):
        self.module = torch.nn.Identity()

    def lm_site(self, name):
        return self.module


@pytest.mark.parametrize("policy, prompt_pass, steps", [
    ("all", [1, 1, 1, 1, 1], [1, 1, 1]),
    ("generated", [0, 0, 0, 0, 0], [1, 1, 1]),
    ("last-prompt", [0, 0, 0, 0, 1], [0, 0, 0]),
    ("from:3", [0, 0, 0, 1, 1], [1, 1, 1]),
    ("from:6", [0, 0, 0, 0, 0], [0, 1, 1]),
])
def test_policies_steer_the_positions_they_name(policy, prompt_pass, steps):
    fake = OneModule()
    with Steering(fake, "lm.0", torch.tensor([1.0, 2.0]), 0.5, PositionPolicy.parse(policy)):
        # a prompt of 5 positions, then 3 generated tokens fed back one at a time
        seen = [fake.module(torch.zeros(1, 5, 2))] + [fake.module(torch.zeros(1, 1, 2)) for _ in range(3)]
        again = fake.module(torch.zeros(1, 5, 2))  # a new prompt pass starts counting again
    added = torch.cat(seen, 1)[0]
    assert added[:, 0].tolist() == [0.5 * m for m in prompt_pass + steps]
    assert torch.equal(added[:, 1], 2 * added[:, 0])
    assert torch.equal(again, seen[0])


def test_bad_policies_and_widths_are_refused(tiny_llava):
    for bad in ("some", "from:", "from:x", "last"):
        with pytest.raises(UserError, match="positions must be"):
            PositionPolicy.parse(bad)
    with pytest.raises(UserError, match="has width 64"):
        Steering(tiny_llava, "lm.0", torch.ones(3), 1.0, PositionPolicy("all"))


def test_generated_policy_leaves_the_prompt_pass_and_steers_every_fed_back_token(tiny_llava):
    prompt = tiny_llava.build_prompt([("What is in the image?", "")], target=False)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    length = len(prompt.input_ids)

    def run(steer):
        with LMRecorder(tiny_llava, ["lm.0"]) as recorder:
            if steer:
                with Steering(tiny_llava, "lm.0", torch.ones(64), 3.0, PositionPolicy("generated")):
                    new = tiny_llava.generate(images, prompt, max_new_tokens=3)
            else:
                new = tiny_llava.generate(images, prompt, max_new_tokens=3)
        return new, recorder.hidden["lm.0"]

    (plain_ids, plain), (steered_ids, steered) = run(False), run(True)
    assert torch.equal(plain[:, :length], steered[:, :length])  # the prompt pass is untouched
    assert torch.equal(plain_ids[:, 0], steered_ids[:, 0])  # so the first answer token cannot change
    # that token is fed back: layer 0 sees the same input there, and its output moves by exactly 3 * ones
    assert torch.allclose(steered[:, length] - plain[:, length], torch.full((2, 64), 3.0), atol=1e-4)


def test_mean_difference_averages_each_samples_rows_first(tmp_path):
    base = write_features(tmp_path / "base", [torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[0.0, 0.0]])])
    target = write_features(tmp_path / "target", [torch.tensor([[0.0, 4.0]])])
    vector, meta = build_vector(base, target)
    assert vector.tolist() == [-1.0, 4.0]  # mean([2, 0], [0, 0]) = [1, 0] -> [0, 4]
    assert meta["site"] == "lm.1" and meta["base_samples"] == 2 and meta["target_samples"] == 1
    path = save_vector(vector, meta, tmp_path / "v.safetensors")
    again, again_meta = load_vector(path)
    assert torch.equal(again, vector) and again_meta == meta
    with pytest.raises(UserError, match="already exists"):
        save_vector(vector, meta, path)
    elsewhere = write_features(tmp_path / "elsewhere", [torch.zeros(2)], site="lm.0")
    with pytest.raises(UserError, match="site 'lm.1'.*'lm.0'"):
        build_vector(base, elsewhere)
    other = write_features(tmp_path / "other", [torch.zeros(2)], model="qwen2-vl")
    with pytest.raises(UserError, match="model 'llava-llama3'.*'qwen2-vl'"):
        build_vector(base, other)
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(UserError, match="is not a steering vector file"):
        load_vector(tmp_path / "junk.safetensors")


def test_answers_before_and_after_side_by_side(tiny_llava, tmp_path):
    colour_images(tmp_path / "images", ["red", "blue", "green"])
    samples = load_samples(images=tmp_path / "images", question="What is in the image?")
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    unchanged = steer_answers(tiny_llava, samples, "lm.1", vector, 0.0, PositionPolicy("all"), max_new_tokens=4)
    assert [r["id"] for r in unchanged] == ["0", "1", "2"]
    assert all(r["before"] == r["after"] for r in unchanged)
    moved = steer_answers(tiny_llava, samples, "lm.1", vector, 50.0, PositionPolicy("all"), max_new_tokens=4)
    assert [r["before"] for r in moved] == [r["before"] for r in unchanged]
    assert any(r["before"] != r["after"] for r in moved)
