"""Hidden-state capture: word matching through tokenizer offsets, every token selector's
positions, states recorded during generation equal to a teacher-forced pass, and bad inputs."""
import json
import shutil

import pytest
import torch
from PIL import Image

from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter
from mimic_toolkit.adapter import IGNORE_INDEX, Prompt
from mimic_toolkit.lm_capture import Features, Selector, capture, find_word, load_samples, token_spans
from mimic_toolkit.errors import UserError

from lm_helpers import bpe_tokenizer


def test_a_word_of_several_pieces_is_matched_whole_and_not_inside_a_longer_word():
    tokenizer = bpe_tokenizer()
    ids = tokenizer("a blueberry and a blue circle", add_special_tokens=False).input_ids
    text, spans = token_spans(tokenizer, ids)
    assert text == "a blueberry and a blue circle"
    pieces = tokenizer.convert_ids_to_tokens(ids)
    word, tokens = find_word(text, spans, ("blue",))
    assert word == "blue" and [pieces[k] for k in tokens] == ["▁bl", "ue"]
    assert tokens[0] == 9  # the second "▁bl": the one of "blueberry" (index 1) is not a whole word
    assert find_word(text, spans, ("berry",)) is None and find_word(text, spans, ("circle", "blue"))[0] == "blue"


def test_spans_of_a_non_canonical_split_come_from_decoding_prefixes():
    tokenizer = bpe_tokenizer()
    piece = tokenizer.convert_tokens_to_ids
    ids = [piece("▁a"), piece("▁b"), piece("l"), piece("ue")]  # "a blue", split otherwise than the tokenizer would
    text, spans = token_spans(tokenizer, ids)
    assert text == "a blue" and spans == [(0, 1), (1, 3), (3, 4), (4, 6)]
    assert find_word(text, spans, ("blue",)) == ("blue", [1, 2, 3])


def test_selector_parsing():
    assert Selector.parse("word:Red, blue") == Selector("word", ("red", "blue"))
    assert Selector.parse("generated").needs_answer and not Selector.parse("image").needs_answer
    for bad in ("tokens", "word:", "word:two words"):
        with pytest.raises(UserError):
            Selector.parse(bad)


class Scripted(LlavaLlama3Adapter):
    """Answers a fixed text: `generate` runs the teacher-forced pass over prompt + answer + end."""

    answer = "a red circle"

    def generate(self, images, prompt, max_new_tokens):
        ids = self.tokenizer(self.answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
        full = torch.cat([prompt.input_ids, torch.tensor(ids)])
        with torch.no_grad():
            self.model(**self.pixel_inputs(images),
                       **self.text_inputs(Prompt(full, torch.full_like(full, IGNORE_INDEX), prompt.image_positions),
                                          images.shape[0]))
        return torch.tensor(ids).expand(images.shape[0], -1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    return folder


def teacher_forced(adapter, images, ids, site):
    """The site's states on prompt + answer for every image, without generation."""
    from mimic_toolkit.lm import LMRecorder

    samples = load_samples(images=images, question="What is in the image?")
    pixels = adapter.preprocess([Image.open(s.image).convert("RGB") for s in samples])
    with torch.no_grad(), LMRecorder(adapter, [site]) as recorder:
        adapter.model(input_ids=ids, pixel_values=pixels)
    return recorder.hidden[site]


def test_every_selector_picks_its_positions(tiny_llava, images, tmp_path):
    adapter = Scripted(tiny_llava.model, tiny_llava.tokenizer)
    samples = load_samples(images=images, question="What is in the image?")
    prompt = adapter.build_prompt([("What is in the image?", "")], target=False)
    length, image = len(prompt.input_ids), prompt.image_positions.tolist()
    answer = adapter.tokenizer("a red circle", add_special_tokens=False).input_ids
    ids = torch.cat([prompt.input_ids, torch.tensor(answer)]).expand(3, -1)
    states = teacher_forced(adapter, images, ids, "lm.1")

    expected = {
        "all": list(range(length + 3)), "image": image, "last-prompt": [length - 1],
        "prompt": [p for p in range(length) if p not in image], "generated": [length, length + 1, length + 2],
        "word:circle": [length + 1],  # the position that predicts "circle"
    }
    for tokens, positions in expected.items():
        folder = capture(adapter, "llava-llama3", samples, "lm.1", Selector.parse(tokens), tmp_path / tokens,
                         batch_size=2, generate=tokens == "all")
        features = Features.load(folder)
        assert [e["positions"] for e in features.index] == [positions] * 3, tokens
        rows = features.matrix().view(3, -1, 64)
        want = states[:, positions].mean(1, keepdim=True) if tokens == "generated" else states[:, positions]
        assert torch.allclose(rows, want, atol=1e-5), tokens
    entry = Features.load(tmp_path / "word:circle").index[0]
    assert entry["generated"] == "a red circle" and entry["word"] == "circle" and entry["alignment"] == "predict"
    assert entry["word_tokens"] == [length + 2]
    own = capture(adapter, "llava-llama3", samples, "lm.1", Selector.parse("word:circle"), tmp_path / "own",
                  word_position="own")
    assert Features.load(own).index[0]["positions"] == [length + 2]


def test_states_recorded_during_generation_equal_a_teacher_forced_pass(tiny_llava, images, tmp_path):
    samples = load_samples(images=images, question="What is in the image?")
    folder = capture(tiny_llava, "llava-llama3", samples, "lm.0", Selector.parse("all"), tmp_path / "f",
                     generate=True, max_new_tokens=4)
    features = Features.load(folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model"] == "llava-llama3" and meta["site"] == "lm.0" and meta["selector"] == "all"
    prompt = tiny_llava.build_prompt([("What is in the image?", "")], target=False)
    rows, owners = features.matrix(), features.row_samples()
    for n, entry in enumerate(features.index):
        ids = torch.cat([prompt.input_ids, torch.tensor(entry["generated_ids"], dtype=torch.long)])[None]
        one = teacher_forced(tiny_llava, images, ids.expand(3, -1), "lm.0")[n]
        assert torch.allclose(rows[owners == n], one[entry["positions"]], atol=1e-4)


def test_samples_whose_answer_lacks_the_word_are_skipped_and_an_empty_selection_writes_nothing(
        tiny_llava, images, tmp_path):
    adapter = Scripted(tiny_llava.model, tiny_llava.tokenizer)
    samples = load_samples(images=images, question="What is in the image?")
    with pytest.raises(UserError, match="empty selection.*'a red circle' has no word square"):
        capture(adapter, "llava-llama3", samples, "lm.1", Selector.parse("word:square"), tmp_path / "f")
    assert not list(tmp_path.iterdir())
    adapter.answer = "a square"
    folder = capture(adapter, "llava-llama3", samples[:2], "lm.1", Selector.parse("word:square"), tmp_path / "f")
    assert len(Features.load(folder).index) == 2
    shutil.rmtree(folder)
    with pytest.raises(UserError, match="has no site 'lm.7'"):
        capture(adapter, "llava-llama3", samples, "lm.7", Selector.parse("image"), tmp_path / "f")
    assert not list(tmp_path.iterdir())


def test_dataset_files_and_their_errors(tmp_path, images):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": str(images / "0.png"), "id": "a", "labels": {"c": "red"}})
                                      + "\n" + json.dumps({"image": str(images / "1.png"), "question": "What?"}) + "\n")
    first, second = load_samples(dataset=tmp_path / "d.jsonl", question="Q?", allow_outside=True)  # absolute paths
    assert (first.id, first.question, first.labels) == ("a", "Q?", {"c": "red"})
    assert (second.id, second.question) == ("1", "What?")
    for content, message in [("{oops", "is not JSON lines"), ('{"question": "q"}', 'needs an "image" path'),
                             ('{"image": "missing.png"}', "does not exist")]:
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(UserError, match=message):
            load_samples(dataset=tmp_path / "bad.jsonl")


def test_a_damaged_features_folder_is_named(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "index.jsonl").write_text("")
    with pytest.raises(UserError, match="is not a features folder"):
        Features.load(tmp_path)
    with pytest.raises(UserError, match="no meta.json"):
        Features.load(tmp_path / "nothing")
