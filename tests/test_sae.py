"""`mimic sae`: the SAE's formulas (FVU, L0, dead and dense latents), SAELens's layout read and
written alike, streamed training equal to in-memory training under a memory cap, token groups,
sparse codes, the lm.embed site, and bad input."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mimic_toolkit.errors import UserError
from mimic_toolkit.lm_capture import FeatureWriter, Features
from mimic_toolkit.sae import SparseAutoencoder, dense_codes, load_sae, save_sae
from mimic_toolkit.sae_train import (InMemoryRows, StreamedRows, TrainSettings, evaluate_sae, train_sae,
                                     train_to_folder)

WIDTH = 12


def make_features(folder, samples=24, image_tokens=6, text_tokens=3, answer_tokens=2, shard_size=40, seed=0):
    """A features folder of `--tokens all` rows: per sample, BOS, image tokens, prompt text, answer;
    rows are sparse mixtures of a few directions, so a small SAE can learn them."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(8, WIDTH, generator=generator) * 3
    writer = FeatureWriter(folder, shard_size)
    length = 1 + image_tokens + text_tokens
    for n in range(samples):
        count = length + answer_tokens
        mix = torch.rand(count, 8, generator=generator) * (torch.rand(count, 8, generator=generator) < 0.25)
        rows = mix @ atoms + 0.01 * torch.randn(count, WIDTH, generator=generator)
        entry = {"id": str(n), "image": f"{n}.png", "question": "q", "prompt_length": length,
                 "image_positions": list(range(1, 1 + image_tokens)), "labels": {"colour": "red" if n % 2 else "blue"},
                 "positions": list(range(count))}
        writer.add(entry, rows)
    return Features.load(writer.finish({"model": "m", "checkpoint": "c", "revision": "", "site": "lm.0",
                                        "selector": "all", "hidden_size": WIDTH}))


def saelens_folder(folder, architecture="jumprelu", d_in=WIDTH, d_sae=20, seed=1, **cfg):
    """An SAE folder written by hand the way SAELens writes one."""
    generator = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_in, d_sae, generator=generator), "W_dec": torch.randn(d_sae, d_in, generator=generator),
               "b_enc": torch.randn(d_sae, generator=generator), "b_dec": torch.randn(d_in, generator=generator)}
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(d_sae, generator=generator) - 0.3  # some below zero
    folder.mkdir()
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": architecture, "d_in": d_in, "d_sae": d_sae,
                                                 "dtype": "float32", "normalize_activations": "none", **cfg}))
    return weights


def test_fvu_is_one_for_the_mean_and_zero_for_a_perfect_reconstruction(tmp_path):
    features = make_features(tmp_path / "f")
    rows = StreamedRows(features, "all")
    x = features.matrix()
    mean_only = SparseAutoencoder(WIDTH, 4, "relu")  # zero decoder: every row becomes b_dec
    with torch.no_grad():
        mean_only.b_dec.copy_(x.mean(0))
        mean_only.b_enc.fill_(-1)  # nothing fires
    metrics = evaluate_sae(mean_only, rows)
    assert metrics["fvu"] == pytest.approx(1, abs=1e-6) and metrics["explained_variance"] == pytest.approx(0, abs=1e-6)
    assert metrics["l0"] == 0 and metrics["dead"] == 4 and metrics["dense"] == 0
    identity = SparseAutoencoder(WIDTH, 2 * WIDTH, "relu", apply_b_dec_to_input=False)  # x = relu(x) - relu(-x)
    eye = torch.eye(WIDTH)
    with torch.no_grad():
        identity.W_enc.copy_(torch.cat([eye, -eye], 1))
        identity.W_dec.copy_(torch.cat([eye, -eye], 0))
    metrics = evaluate_sae(identity, rows)
    assert metrics["fvu"] == pytest.approx(0, abs=1e-9) and metrics["cosine"] == pytest.approx(1, abs=1e-6)
    fired = (identity.encode(x) > 0).float().mean(0)
    assert metrics["dense"] == int((fired > 0.1).sum()) and metrics["l0"] == pytest.approx(float((x != 0).sum(1).float().mean()))


@pytest.mark.parametrize("architecture,cfg", [("jumprelu", {"apply_b_dec_to_input": False}),
                                              ("topk", {"k": 5, "apply_b_dec_to_input": True}),
                                              ("standard", {"apply_b_dec_to_input": True})])
def test_a_saelens_folder_and_one_we_write_encode_and_decode_alike(tmp_path, architecture, cfg):
    w = saelens_folder(tmp_path / "saelens", architecture, **cfg)
    x = torch.randn(50, WIDTH, generator=torch.Generator().manual_seed(2)) * 2
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]  # SAELens's formulas
    if architecture == "jumprelu":
        expected = pre.relu() * (pre > w["threshold"])
    elif architecture == "topk":
        top = pre.topk(5, dim=-1)
        expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        expected = pre.relu()
    sae, _ = load_sae(tmp_path / "saelens")
    assert torch.allclose(sae.encode(x), expected, atol=1e-6)
    assert torch.allclose(sae(x), expected @ w["W_dec"] + w["b_dec"], atol=1e-6)
    (tmp_path / "ours").mkdir()
    save_sae(sae, tmp_path / "ours", {"site": "lm.3", "model": "m"})
    again, cfg_ours = load_sae(tmp_path / "ours")
    assert cfg_ours["mimic"]["site"] == "lm.3" and cfg_ours["hook_name"] == "lm.3"
    assert torch.allclose(again.encode(x), sae.encode(x), atol=1e-6) and torch.allclose(again(x), sae(x), atol=1e-6)


def test_a_trained_sae_is_written_with_its_input_scale_folded_in(tmp_path):
    sae = SparseAutoencoder(WIDTH, 20, "topk", 3, input_scale=7.5)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    (tmp_path / "s").mkdir()
    save_sae(sae, tmp_path / "s", {})
    loaded, cfg = load_sae(tmp_path / "s")
    x = torch.randn(30, WIDTH) * 10
    assert loaded.input_scale == 1 and cfg["mimic"]["input_scale"] == 7.5
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5) and torch.allclose(loaded(x), sae(x), atol=1e-4)


def test_streamed_training_equals_in_memory_training_and_holds_at_most_the_buffer(tmp_path):
    features = make_features(tmp_path / "f", samples=60)
    assert len(features.meta["shards"]) >= 5
    settings = TrainSettings(d_sae=24, k=3, steps=60, batch_size=16, buffer_rows=50, seed=3, log_every=20)
    streamed = StreamedRows(features, "image")
    a, log_a = train_sae(streamed, settings)
    b, log_b = train_sae(InMemoryRows(features, "image"), settings)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    assert log_a == log_b and a.input_scale == b.input_scale
    assert streamed.peak_rows <= settings.buffer_rows + settings.batch_size
    other, _ = train_sae(InMemoryRows(features, "image"), TrainSettings(**{**settings.__dict__, "seed": 4}))
    assert not torch.allclose(other.W_enc, a.W_enc)  # the seed matters: the equality above is not trivial


def test_token_groups_come_from_the_index_positions(tmp_path):
    features = make_features(tmp_path / "f", samples=5)
    counts = {group: StreamedRows(features, group).rows for group in ("image", "prompt", "answer", "all")}
    assert counts == {"image": 30, "prompt": 20, "answer": 10, "all": 60}  # prompt: BOS and 3 text tokens
    matrix, rows = features.matrix(), StreamedRows(features, "answer")
    got = torch.cat([rows.shard(n) for n in range(len(rows.selected))])
    assert torch.equal(got, torch.cat([matrix[n * 12 + 10:n * 12 + 12] for n in range(5)]))  # 12 rows a sample
    with pytest.raises(UserError, match="--tokens must be"):
        StreamedRows(features, "pictures")


def test_a_trained_folder_has_topk_codes_that_decode_to_its_reconstruction(tmp_path):
    features = make_features(tmp_path / "f", samples=40)
    settings = TrainSettings(d_sae=32, k=4, steps=300, batch_size=32, lr=3e-3, log_every=50)
    out = train_to_folder(features, "image", settings, tmp_path / "sae")
    assert {p.name for p in out.iterdir()} >= {"cfg.json", "sae_weights.safetensors", "metrics.jsonl", "report.html",
                                               "evaluation.json", "codes"}
    sae, cfg = load_sae(out)
    assert cfg["mimic"]["tokens"] == "image" and cfg["mimic"]["site"] == "lm.0" and len(cfg["mimic"]["features_sha256"]) == 16
    evaluation = json.loads((out / "evaluation.json").read_text())["image"]
    assert evaluation["l0"] == pytest.approx(4) and evaluation["fvu"] < 0.2
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 300 and log[-1]["fvu"] < log[0]["fvu"]
    index = [json.loads(line) for line in (out / "codes" / "index.jsonl").read_text().splitlines()]
    meta = json.loads((out / "codes" / "meta.json").read_text())
    assert meta["rows"] == 40 * 6 and [e["id"] for e in index] == features.ids
    from safetensors.torch import load_file

    rows = StreamedRows(features, "image")
    for number, name in enumerate(meta["shards"]):
        stored = load_file(str(out / "codes" / name))
        assert stored["indices"].shape[1] == 4 and stored["indices"].dtype == torch.int32
        x = rows.shard(number)
        assert torch.allclose(sae.decode(dense_codes(stored["indices"], stored["values"], sae.d_sae)), sae(x), atol=1e-5)
    entry = index[1]
    assert entry["positions"] == list(range(1, 7)) and entry["rows"][1] - entry["rows"][0] == 6


def test_bad_sae_folders_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not an SAE folder"):
        load_sae(tmp_path)
    saelens_folder(tmp_path / "gated", "gated")
    with pytest.raises(UserError, match="architecture 'gated'"):
        load_sae(tmp_path / "gated")
    saelens_folder(tmp_path / "wide", "standard", d_in=WIDTH)
    cfg = json.loads((tmp_path / "wide" / "cfg.json").read_text())
    (tmp_path / "wide" / "cfg.json").write_text(json.dumps({**cfg, "d_in": WIDTH + 1}))
    with pytest.raises(UserError, match="W_enc must be"):
        load_sae(tmp_path / "wide")
    saelens_folder(tmp_path / "scaled", "standard", normalize_activations="expected_average_only_in")
    with pytest.raises(UserError, match="normalize_activations"):
        load_sae(tmp_path / "scaled")
    saelens_folder(tmp_path / "topk", "topk")
    with pytest.raises(UserError, match="integer k"):
        load_sae(tmp_path / "topk")
    features = make_features(tmp_path / "f", samples=4)
    with pytest.raises(UserError, match="inference only"):
        train_sae(StreamedRows(features, "all"), TrainSettings(architecture="jumprelu"))
    with pytest.raises(UserError, match="batch-size"):
        train_sae(StreamedRows(features, "image"), TrainSettings(batch_size=1000))


def test_lm_embed_is_the_text_embedding_with_the_image_features_in_place(tiny_llava):
    from mimic_toolkit.engine import format_prompt
    from mimic_toolkit.lm import LMRecorder, PositionPolicy, Steering

    adapter = tiny_llava
    prompt = format_prompt(adapter, [("What is in the image?", "")], target=False)
    images = torch.randn(2, 3, adapter.resolution, adapter.resolution)
    inputs = {**adapter.pixel_inputs(images), **adapter.text_inputs(prompt, 2)}
    with torch.no_grad(), LMRecorder(adapter, ["lm.embed", "lm.0"]) as recorder:
        adapter.model(**inputs)
    embed = recorder.hidden["lm.embed"]
    text = [p for p in range(len(prompt.input_ids)) if p not in set(prompt.image_positions.tolist())]
    words = adapter.model.get_input_embeddings()(prompt.input_ids[text])
    assert torch.allclose(embed[0, text], words) and torch.allclose(embed[1, text], words)
    image = prompt.image_positions
    assert not torch.allclose(embed[0, image], embed[1, image])  # the projected image features, per image
    with torch.no_grad(), Steering(adapter, "lm.embed", torch.ones(adapter.hidden_size), 1.0,
                                   PositionPolicy("last-prompt")), LMRecorder(adapter, ["lm.0"]) as steered:
        adapter.model(**inputs)
    change = (steered.hidden["lm.0"] - recorder.hidden["lm.0"]).abs().amax(dim=(0, 2))
    assert change[-1] > 0.1 and change[:-1].max() < 1e-5  # replacing the input reaches the first layer


# -- end to end on the tiny LLaVA checkpoint ------------------------------------------------------------
def identity_sae(width):
    """Reconstructs every row exactly: x = relu(x) - relu(-x)."""
    sae = SparseAutoencoder(width, 2 * width, "relu", apply_b_dec_to_input=False)
    eye = torch.eye(width)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def test_a_perfect_sae_spliced_in_recovers_all_ce_and_the_last_layer_is_not_read(tiny_llava, tmp_path):
    from lm_helpers import colour_images
    from mimic_toolkit.lm_capture import load_samples
    from mimic_toolkit.sae_splice import splice_metrics

    colour_images(tmp_path / "images", ["red", "blue", "green"])
    samples = load_samples(images=tmp_path / "images", question="What is in the image?")
    sae = identity_sae(tiny_llava.hidden_size)
    result = splice_metrics(tiny_llava, sae, "lm.0", samples, "image", max_new_tokens=3)
    assert result["ce"]["sae"] == pytest.approx(result["ce"]["clean"], abs=1e-4)
    assert result["ce"]["zero"] > result["ce"]["clean"] + 1e-3  # zeroing the image tokens at lm.0 matters
    assert result["recovered"] == pytest.approx(1, abs=1e-3) and result["unchanged"]["sae"] == 1
    assert result["kl"]["sae"] == pytest.approx(0, abs=1e-4) and result["kl"]["zero"] > 0
    last = splice_metrics(tiny_llava, sae, "lm.1", samples, "image", max_new_tokens=3)
    assert last["recovered"] is None and "nothing downstream reads" in last["note"]
    assert last["ce"]["zero"] == pytest.approx(last["ce"]["clean"], abs=1e-6)


@pytest.mark.slow
def test_train_eval_import_and_cards_through_the_cli(tiny_checkpoint, in_tmp):
    from typer.testing import CliRunner

    from lm_helpers import colour_images
    from mimic_toolkit.cli import app

    colours = ["red", "blue", "green", "red", "blue", "green"]
    paths = colour_images(in_tmp / "images", colours)
    (in_tmp / "data.jsonl").write_text("".join(json.dumps({"image": f"images/{p.name}", "labels": {"colour": c}}) + "\n"
                                               for p, c in zip(paths, colours)))
    runner = CliRunner()
    run = lambda *args: runner.invoke(app, [str(a) for a in args])
    model = ["--model", "llava-llama3", "--checkpoint", tiny_checkpoint]
    result = run("capture", *model, "--dataset", "data.jsonl", "--site", "lm.0", "--tokens", "all", "--out", "f")
    assert result.exit_code == 0, result.output
    result = run("sae", "train", "--features", "f", "--tokens", "image", "--k", "4", "--width", "2", "--steps", "40",
                 "--batch-size", "32", "--out", "sae")
    assert result.exit_code == 0, result.output
    assert "image: FVU" in result.output and (in_tmp / "sae" / "codes" / "meta.json").is_file()
    result = run("sae", "eval", "--sae", "sae", "--features", "f", *model, "--max-new-tokens", "3", "--out", "eval.json")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((in_tmp / "eval.json").read_text())
    assert set(evaluation["groups"]) == {"image", "all"} and evaluation["groups"]["image"]["l0"] <= 4
    assert evaluation["splice"]["tokens"] == "image" and evaluation["splice"]["samples"] == 6
    saelens_folder(in_tmp / "downloaded", "jumprelu", d_in=64, d_sae=16, apply_b_dec_to_input=False)
    result = run("sae", "import", "--saelens", "downloaded", "--site", "lm.0", "--out", "imported")
    assert result.exit_code == 0 and "jumprelu SAE, 16 latents on 64 inputs, site lm.0" in result.output
    assert json.loads((in_tmp / "imported" / "cfg.json").read_text())["mimic"]["site"] == "lm.0"
    result = run("sae", "features", "--sae", "sae", "--features", "f", "--top", "3", "--latents", "4", "--no-words",
                 "--out", "cards")
    assert result.exit_code == 0, result.output
    cards = json.loads((in_tmp / "cards" / "cards.json").read_text())["cards"]
    assert 1 <= len(cards) <= 4 and all(1 <= len(c["top"]) <= 3 for c in cards)
    assert "<img src='data:image/png" in (in_tmp / "cards" / "index.html").read_text()
    for args, fragment in [(("sae", "import", "--saelens", "nowhere", "--site", "lm.0", "--out", "x"), "not an SAE folder"),
                           (("sae", "train", "--features", "f", "--out", "sae"), "already exists"),
                           (("sae", "eval", "--sae", "imported", "--features", "f", "--tokens", "pixels"), "--tokens must be"),
                           (("sae", "train", "--features", "f", "--tokens", "image", "--arch", "gated", "--out", "g"),
                            "--arch must be"),
                           (("sae", "layers", "--dataset", "data.jsonl", "--test-fraction", "0", "--out", "s"),
                            "leaves no training or no held-out sample")]:
        result = run(*args)
        assert result.exit_code == 2 and fragment in result.output, (args, result.output)


def test_adapters_declare_the_grid_their_image_tokens_lie_on(tiny_llava):
    from mimic_plugins.idefics2.adapter import Idefics2Adapter
    from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter

    side = tiny_llava.resolution // tiny_llava.patch_size
    assert tiny_llava.image_token_grid() == (side, side, tiny_llava.image_token_count() - side * side)
    qwen = Qwen2VLAdapter.tiny()
    rows, cols, first = qwen.image_token_grid()
    assert rows * cols == qwen.image_token_count() and first == 0  # merged 2x2 blocks
    assert Idefics2Adapter.tiny().image_token_grid() is None  # resampled by the perceiver: no grid


def _tiny_adapter_classes():
    from test_adapter_contract import tiny_adapter_classes

    return tiny_adapter_classes()


@pytest.mark.parametrize("adapter_class", _tiny_adapter_classes(), ids=lambda adapter_class: adapter_class.__name__)
def test_vision_out_and_projector_out_fire_and_the_projected_tokens_are_lm_embed_at_the_image(adapter_class):
    """On every adapter with a tiny architecture. Where the LM sees exactly the projected tokens
    as its image tokens, they are lm.embed there; layouts that add tokens after projecting (image
    newlines) have more image positions than projected tokens."""
    from mimic_toolkit.engine import format_prompt
    from mimic_toolkit.hooks import SiteHooks
    from mimic_toolkit.lm import LMRecorder

    adapter = adapter_class.tiny()

    class Record(SiteHooks):
        def on_output(self, site, output):
            self.tokens[site] = adapter.site_tokens(site, output, 2)

    prompt = format_prompt(adapter, [("What is in the image?", "")], target=False)
    images = torch.randn(2, 3, adapter.resolution, adapter.resolution)
    recorder = Record(adapter.image_sites())
    recorder.tokens = {}
    with torch.no_grad(), recorder, LMRecorder(adapter, ["lm.embed"]) as embed:
        adapter.model(**adapter.pixel_inputs(images), **adapter.text_inputs(prompt, 2))
    projected, vision = recorder.tokens["projector.out"], recorder.tokens["vision.out"]
    assert projected.shape[0] == 2 and projected.shape[2] == adapter.hidden_size and vision.shape[0] == 2
    positions = prompt.image_positions
    if projected.shape[1] == len(positions):
        assert torch.allclose(embed.hidden["lm.embed"][:, positions].float(), projected.float(), atol=1e-4)
    else:
        assert projected.shape[1] < len(positions)


def test_image_rows_are_each_samples_own_across_shards(tmp_path):
    from mimic_toolkit.sae_study import _image_rows

    features = make_features(tmp_path / "f", samples=15)
    assert len(features.meta["shards"]) >= 3
    matrix, owners = features.matrix(), features.row_samples()
    rows = _image_rows(features)
    assert len(rows) == 15
    for n, got in enumerate(rows):
        assert torch.equal(got, matrix[owners == n][1:7])  # BOS first, then the 6 image tokens


def test_probe_purity_and_judge_measure_what_they_say():
    from mimic_toolkit.sae_study import judge_match, latent_purity, probe_accuracy

    generator = torch.Generator().manual_seed(0)
    labels = ["red", "blue"] * 20
    x = torch.randn(40, 5, generator=generator) + torch.tensor([[3.0, 0, 0, 0, 0] if c == "red" else [0.0] * 5
                                                               for c in labels])
    assert probe_accuracy(x[:30], labels[:30], x[30:], labels[30:]) == 1
    assert probe_accuracy(torch.randn(30, 5, generator=generator), labels[:30], torch.randn(10, 5), labels[30:]) < 1
    pure = torch.tensor([[1.0, 0] if c == "red" else [0, 1.0] for c in labels])  # latent 0: red images only
    assert latent_purity(pure, labels, top=10) == 1
    assert latent_purity(torch.ones(40, 1), labels, top=10) < 1
    words = [["red", "circle"], ["blue"]]
    truth = [{"colour": c} for c in labels]
    assert judge_match(pure, words, truth, latents=1) == 1
    assert judge_match(pure, words, [{"colour": "green"}] * 40, latents=1) == 0


@pytest.mark.slow
def test_the_layer_study_on_the_tiny_checkpoint(tiny_llava, tmp_path):
    from lm_helpers import colour_images
    from mimic_toolkit.lm_capture import Sample
    from mimic_toolkit.sae_study import run_layers

    colours = ["red", "blue", "green"] * 4
    paths = colour_images(tmp_path / "images", colours)
    samples = [Sample(str(n), p, "What is in the image?", {"colour": c, "answer": f"a {c} circle"})
               for n, (p, c) in enumerate(zip(paths, colours))]
    out = run_layers(tiny_llava, "llava-llama3", "", samples[:8], samples[8:], ["projector.out", "lm.0", "lm.1"],
                     tmp_path / "study", settings=TrainSettings(d_sae=64, k=4, steps=20, batch_size=32),
                     on_progress=lambda line: None)
    study = json.loads((out / "study.json").read_text())
    projector, first, last = study["rows"]
    assert projector["splice"] is None and projector["groups"]["prompt"] is None
    assert first["splice"]["recovered"] is not None and last["splice"]["recovered"] is None
    text_rows = StreamedRows(Features.load(out / "features" / "text-only" / "lm-0"), "all").rows
    assert first["groups"]["text-only"]["rows"] == text_rows and text_rows > 4 * 3  # 4 prompts of words
    assert all(0 <= row["readability"] <= 1 and 0 <= row["probe"]["colour"] <= 1 for row in study["rows"])
    assert (out / "report.html").read_text().count("<svg") == 8
