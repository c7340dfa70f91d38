"""mimic icl: the attention wrapper is exact (a shift from the true demonstration keys and values
makes the zero-shot pass reproduce the few-shot per-head outputs), MimIC with v = 0 changes nothing,
the implementation is restored, modules round-trip, multi-image prompts, and the commands."""
import json
import types

import pytest
import torch
from PIL import Image
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from mimic_toolkit.errors import UserError
from mimic_toolkit.icl import MimicModule, LiveModule, lm_shape
from mimic_toolkit.icl_attention import ExactShift, ShiftedAttention, check_attention_interface, log_normaliser
from mimic_toolkit.testing import tiny_adapter

ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                 "mistral": (MistralConfig, MistralForCausalLM)}
# (implementation, mask passed): sdpa with no mask (the causal mask is implied), sdpa with a boolean
# 4-D mask, eager with an additive one
MASKS = [("sdpa", None), ("sdpa", "bool"), ("eager", "additive")]
PREFIX, DEMOS, QUERY = 2, 5, 4


def tiny_lm(architecture: str, implementation: str):
    config_class, model_class = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    config = config_class(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,  # grouped-query attention
                          max_position_embeddings=64, attn_implementation=implementation)
    model = model_class(config).eval()
    return model, types.SimpleNamespace(language_model=model.model)


def mask_of(kind, queries: int, keys: int):
    if kind is None:
        return None
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]
    if kind == "bool":
        return causal
    return torch.zeros(1, 1, queries, keys).masked_fill(~causal, torch.finfo(torch.float32).min)


class HeadOutputs:
    """The o_proj inputs (every head's output) of each layer, per forward."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def __enter__(self):
        self.handles = [layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i))
                        for i, layer in enumerate(self.model.model.layers)]
        return self

    def _hook(self, i):
        def hook(module, args):
            self.seen[i] = args[0]
        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("implementation,mask", MASKS)
def test_exact_shift_reproduces_few_shot_heads(architecture, implementation, mask):
    model, lm = tiny_lm(architecture, implementation)
    g = torch.Generator().manual_seed(1)
    prefix, demos, query = (torch.randint(0, 40, (n,), generator=g) for n in (PREFIX, DEMOS, QUERY))
    few_shot, zero_shot = torch.cat([prefix, demos, query])[None], torch.cat([prefix, query])[None]
    length = few_shot.shape[1]
    # the zero-shot pass at the few-shot pass's positions: RoPE then sees the same relative offsets
    positions = torch.cat([torch.arange(PREFIX), torch.arange(PREFIX + DEMOS, length)])[None]
    with torch.no_grad():
        with HeadOutputs(model) as heads:
            teacher = model(few_shot, attention_mask=mask_of(mask, length, length), use_cache=True)
            teacher_heads = dict(heads.seen)
            cache = teacher.past_key_values
            keys = [cache.layers[i].keys[:, :, PREFIX:PREFIX + DEMOS].clone() for i in range(2)]
            values = [cache.layers[i].values[:, :, PREFIX:PREFIX + DEMOS].clone() for i in range(2)]
            plain = model(zero_shot, position_ids=positions, attention_mask=mask_of(mask, 6, 6))
            plain_heads = dict(heads.seen)
            with ShiftedAttention(lm, ExactShift(keys, values, start=PREFIX)):
                student = model(zero_shot, position_ids=positions, attention_mask=mask_of(mask, 6, 6), use_cache=True)
            student_heads = dict(heads.seen)
            for i in range(2):
                torch.testing.assert_close(student_heads[i][0, PREFIX:], teacher_heads[i][0, PREFIX + DEMOS:],
                                           atol=1e-5, rtol=0)
            # the check can fail: without the shift the query's heads differ
            assert (plain_heads[1][0, PREFIX:] - teacher_heads[1][0, PREFIX + DEMOS:]).abs().max() > 1e-3

            token, step_position = torch.tensor([[3]]), torch.tensor([[length]])  # a cached decode step
            teacher_step = model(token, past_key_values=teacher.past_key_values, position_ids=step_position,
                                 attention_mask=mask_of(mask, 1, length + 1))
            teacher_heads = dict(heads.seen)
            with ShiftedAttention(lm, ExactShift(keys, values, start=PREFIX)):
                student_step = model(token, past_key_values=student.past_key_values, position_ids=step_position,
                                     attention_mask=mask_of(mask, 1, 7))
            for i in range(2):
                torch.testing.assert_close(heads.seen[i], teacher_heads[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(student_step.logits, teacher_step.logits, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == implementation  # restored


def test_zero_vector_is_bit_identical_and_restored():
    model, lm = tiny_lm("llama", "sdpa")
    ids = torch.randint(0, 40, (2, 7))
    module = MimicModule(layers=2, heads=4, head_dim=8, hidden_size=32)
    with torch.no_grad():
        module.w.normal_()
        module.b.normal_()  # gates are not zero; only v is
        before = model(ids).logits
        with module.applied(lm) as context:
            assert model.config._attn_implementation == "mimic_icl_sdpa"
            during = model(ids).logits
        assert context.calls == {0, 1}  # every layer went through the wrapper
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(before, during)
        module.v.normal_()
        with module.applied(lm):
            shifted = model(ids).logits
        assert not torch.allclose(before, shifted)
        with pytest.raises(RuntimeError), module.applied(lm):
            raise RuntimeError("a failing forward")
        assert model.config._attn_implementation == "sdpa"  # restored after an error too
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_log_normaliser_is_fp32_under_bf16():
    g = torch.Generator().manual_seed(0)
    query = (torch.randn(1, 4, 5, 8, generator=g) * 8).bfloat16()
    key = (torch.randn(1, 2, 5, 8, generator=g) * 8).bfloat16()
    got = log_normaliser(query, key, None, 8 ** -0.5)
    assert got.dtype == torch.float32
    grouped = key.double().repeat_interleave(2, dim=1)
    scores = query.double() @ grouped.transpose(-1, -2) * 8 ** -0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got.double(), scores.logsumexp(-1), atol=1e-4, rtol=0)


def _adapter_ids():
    from mimic_toolkit.registry import default_registry

    return [i for i in default_registry().adapter_specs() if not i.startswith("toy")]  # the toys: llava-llama3's


@pytest.mark.parametrize("model_id", _adapter_ids())
def test_real_adapters_use_the_attention_interface(model_id):
    adapter = tiny_adapter(model_id)
    check_attention_interface(adapter, model_id)
    ids = torch.tensor([[1, 2, 3]])
    module = MimicModule(**lm_shape(adapter))
    with torch.no_grad():
        module.v.normal_()
        plain = adapter.language_model(input_ids=ids).last_hidden_state
        with module.applied(adapter):
            shifted = adapter.language_model(input_ids=ids).last_hidden_state
    assert not torch.allclose(plain, shifted)


def test_attention_that_bypasses_the_interface_is_refused():
    adapter = tiny_adapter("llava-llama3")
    attention = adapter.language_model.layers[1].self_attn
    attention.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)
    with pytest.raises(UserError, match="layers \\[1\\] does not call transformers' attention interface"):
        check_attention_interface(adapter, "llava-llama3")


@pytest.mark.parametrize("model_id", ["llava-llama3", "qwen2-vl", "idefics2"])
def test_prompts_with_demonstration_images(model_id):
    from mimic_toolkit.engine import format_prompt

    adapter = tiny_adapter(model_id)
    turns = [("What is it?", "red"), ("What is it?", "blue"), ("What is it?", "red")]
    few = format_prompt(adapter, turns, image_turns=(0, 1, 2))
    zero = format_prompt(adapter, turns[-1:])
    count = adapter.image_token_count()
    assert len(few.image_spans) == 3 and all(end - start == count for start, end in few.image_spans)
    assert bool((few.input_ids[few.image_positions] == adapter.image_token_id).all())
    assert len(few.image_positions) == 3 * count
    assert few.input_ids[few.query_start:].tolist() == zero.input_ids[zero.query_start:].tolist()
    text_only = format_prompt(adapter, turns, image_turns=(2,))
    assert len(text_only.image_spans) == 1 and text_only.image_spans[0][0] > text_only.query_start - 1
    size = adapter.resolution
    images = torch.rand(4, 3, size, size)  # one prompt with three images, one with one
    inputs = {**adapter.pixel_inputs(adapter.normalise(images)), **adapter.padded_text_inputs([few, zero])}
    with torch.no_grad():
        logits = adapter.model(**inputs).logits
    assert logits.shape[:2] == (2, len(few.input_ids)) and torch.isfinite(logits).all()


def test_module_save_load_round_trip(tmp_path):
    from mimic_toolkit.icl import load_module, save_module

    adapter = tiny_adapter("llava-llama3")
    shape = lm_shape(adapter)
    for module_class in (MimicModule, LiveModule):
        module = module_class(**shape)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
        folder = tmp_path / module_class.method
        folder.mkdir()
        save_module(module, {"format": "mimic-icl/1", "method": module.method, "model": "llava-llama3",
                             "shape": shape}, folder)
        loaded, meta = load_module(folder, adapter, "llava-llama3")
        for (name, a), (_, b) in zip(module.named_parameters(), loaded.named_parameters()):
            assert torch.equal(a, b), name
        with pytest.raises(UserError, match="trained on model 'llava-llama3', not 'other'"):
            load_module(folder, adapter, "other")
        meta["shape"] = {**shape, "layers": shape["layers"] + 1}
        (folder / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match=f"has layers {shape['layers'] + 1}; model"):
            load_module(folder, adapter, "llava-llama3")


def _dataset(folder, n, answer_of):
    folder.mkdir()
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    lines = []
    for i in range(n):
        name = list(colours)[i % 2]
        Image.new("RGB", (32, 32), colours[name]).save(folder / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "image": f"{i}.png", "question": "What colour is it?",
                                 "answer": answer_of(name)}))
    (folder / "icl.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "icl.jsonl"


@pytest.mark.slow
def test_icl_commands(tiny_checkpoint, in_tmp):
    from typer.testing import CliRunner

    from mimic_toolkit.cli import app

    dataset = _dataset(in_tmp / "data", 12, lambda name: name)
    common = ["--model", "llava-llama3", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    run = lambda *args: CliRunner().invoke(app, list(args))
    split = ["--demonstrations-pool", "3", "--held-out", "4"]
    result = run("icl", "eval", "--dataset", str(dataset), "--shots", "0,1", "--out", "shots", *split, *common)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["shots"] for line in (in_tmp / "shots" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    for method in ("mimic", "live"):
        result = run("icl", "train", "--dataset", str(dataset), "--method", method, "--shots", "1", "--out", method,
                     "--steps", "2", "--batch-size", "2", "--side", str(dataset), *split, *common)
        assert result.exit_code == 0, result.output
        folder = in_tmp / method
        assert {p.name for p in folder.iterdir()} == {"module.safetensors", "meta.json", "metrics.jsonl", "report.html"}
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["method"] == method and meta["split"]["sizes"] == {"demonstrations": 3, "train": 5, "held_out": 4}
        assert "side effects" in (folder / "report.html").read_text().lower()
    result = run("icl", "eval", "--dataset", str(dataset), "--baseline", "mean-difference", "--shots", "1",
                 "--layer", "1", "--out", "baseline", *split, *common)
    assert result.exit_code == 0, result.output
    meta = json.loads((in_tmp / "baseline" / "meta.json").read_text())
    assert meta["method"] == "mean-difference" and meta["layer"] == 1 and meta["parameters"] == 64
    result = run("icl", "train", "--dataset", str(dataset), "--out", "mimic", *split, *common)
    assert result.exit_code == 2 and "already exists" in result.output
    result = run("icl", "eval", "--dataset", str(dataset), "--module", "mimic", "--shots", "0", "--out", "again")
    assert result.exit_code == 0, result.output
    first = [json.loads(line) for line in (in_tmp / "mimic" / "metrics.jsonl").read_text().splitlines()][-2]
    again = json.loads((in_tmp / "again" / "metrics.jsonl").read_text().splitlines()[0])
    assert again["accuracy"] == first["accuracy"]  # the same split, read back from meta.json
    result = run("icl", "apply", "--module", "live", "--images", str(in_tmp / "data"), "--question",
                 "What colour is it?", "--out", "answers.jsonl", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in (in_tmp / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and {"answer", "answer_without_module"} <= set(answers[0])
    result = run("icl", "eval", "--dataset", str(dataset), "--module", "mimic", "--out", "other", "--model", "qwen2-vl")
    assert result.exit_code == 2 and "error:" in result.output
    result = run("icl", "train", "--dataset", str(dataset), "--method", "lora", "--out", "x", *common)
    assert result.exit_code == 2 and "--method must be mimic or live" in result.output
    result = run("icl", "train", "--dataset", str(dataset), "--steps", "0", "--out", "x", *split, "--model", "no-such-model")
    assert result.exit_code == 2 and "--steps must be at least 1" in result.output  # before any model loads


@pytest.mark.slow
def test_toy_icl_episodes_and_dataset(tmp_path):
    from mimic_plugins.toy_shapes import shapes
    from mimic_plugins.toy_shapes.train_icl import episode_prompt, episode_turns, make_icl_batch, write_icl_dataset

    import numpy as np

    from mimic_toolkit.engine import load_model
    from mimic_toolkit.icl import load_dataset

    adapter = load_model("toy-shapes-icl", device="cpu")
    rng = np.random.default_rng(0)
    turns = episode_turns(shapes.class_index("circle", "red"), "shape", 2, rng)
    assert turns[-1] == ("What is it?", "circle") and all(a in shapes.SHAPES for _, a in turns)
    prompt = episode_prompt(adapter, turns)
    assert len(prompt.image_spans) == 1 and prompt.image_spans[0][0] >= prompt.query_start  # text demonstrations
    batch = make_icl_batch(adapter, (0, 9), 6, shots=0, task="shape")
    _, labels = shapes.sample((0, 9), 6)
    answers = [adapter.tokenizer.convert_ids_to_tokens(row[row != -100].tolist())[0] for row in batch["labels"]]
    assert answers == [shapes.split_class(i)[1] for i in labels.tolist()]  # zero shots: the colour
    samples = load_dataset(write_icl_dataset(tmp_path / "d", n=4, task="colour") / "icl.jsonl")
    assert [s.answer for s in samples] == [s.labels["colour"] for s in samples] and samples[0].image.is_file()


def test_heads_site_records_the_shift_per_head():
    from mimic_toolkit.lm import LMRecorder

    adapter = tiny_adapter("llava-llama3")
    shape = lm_shape(adapter)
    module = MimicModule(**shape)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        module.v.normal_()
        with LMRecorder(adapter, ["lm.0.heads"]) as plain:
            adapter.language_model(input_ids=ids)
        with LMRecorder(adapter, ["lm.0.heads"]) as shifted, module.applied(adapter):
            adapter.language_model(input_ids=ids)
    view = lambda states: states.reshape(1, 4, shape["heads"], shape["head_dim"])
    delta = view(shifted.hidden["lm.0.heads"]) - view(plain.hidden["lm.0.heads"])
    # layer 0 (its inputs are unshifted): mu * v_h at every position, along each head's own vector
    cosine = torch.nn.functional.cosine_similarity(delta, module.v[0][None, None].expand_as(delta), dim=-1)
    assert delta.abs().amax() > 1e-3 and torch.allclose(cosine, torch.ones_like(cosine), atol=1e-4)


def test_bad_input_is_one_line(tmp_path):
    from mimic_toolkit.icl import load_dataset, read_meta, split_dataset

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "question": "What is it?"}) + "\n")
    with pytest.raises(UserError, match="entry 'a' has no \"answer\""):
        load_dataset(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "answer": "red"}) + "\n")
    with pytest.raises(UserError, match="too few for 1 demonstrations, 1 held-out"):
        split_dataset(load_dataset(tmp_path / "d.jsonl"), 0, 1, 1)
    with pytest.raises(UserError, match="not an icl module folder"):
        read_meta(tmp_path)
    model, lm = tiny_lm("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UserError, match="uses 'flex_attention'"):
        with ShiftedAttention(lm, MimicModule(2, 4, 8, 32)):
            pass
