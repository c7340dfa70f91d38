"""`mimic compare` on the toy and the tiny models: one folder with the runs of every model and
concept, a labelled grid, the transfer matrix per concept and averaged, the toy verifier's accuracy,
a report; a model that fails is reported and the others complete; the same comparison from run
folders made elsewhere (`--runs`), and from one process per model."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from mimic_toolkit.cli import app


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from mimic_plugins.idefics2.adapter import Idefics2Adapter
    from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter

    folders = {}
    for name, cls in (("qwen2-vl", Qwen2VLAdapter), ("idefics2", Idefics2Adapter)):
        folders[name] = tmp_path_factory.mktemp(name)
        cls.tiny().save(folders[name])
    return folders


@pytest.mark.slow
def test_compare_three_tiny_models_and_a_failing_one(tiny_checkpoint, tiny_checkpoints, in_tmp):
    (in_tmp / "corrupt").mkdir()
    (in_tmp / "corrupt" / "config.json").write_text("{ not json")  # found, but fails when loaded
    args = ["compare", "--models", "llava-llama3,qwen2-vl,idefics2,toy-shapes", "--outputs", "cmp",
            "--checkpoint", f"llava-llama3={tiny_checkpoint}", "--checkpoint", f"qwen2-vl={tiny_checkpoints['qwen2-vl']}",
            "--checkpoint", f"idefics2={tiny_checkpoints['idefics2']}", "--checkpoint", "toy-shapes=corrupt",
            "--question", "What is in the image?", "--answer", "a red circle", "--iterations", "2",
            "--batch-size", "1", "--scale", "feature=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # the comparison completes, and says a model failed
    assert result.stderr.strip().splitlines()[-1] == "failed: toy-shapes (see the report)"
    folder = in_tmp / "cmp"
    data = json.loads((folder / "comparison.json").read_text())
    assert "could not read the model config" in data["models"]["toy-shapes"]["error"]
    ok = ["llava-llama3", "qwen2-vl", "idefics2"]
    for model in ok:  # "a red circle" is no concept of the first model's (ImageNet) prompt file
        assert (folder / model / "direct" / "report.html").is_file() and "error" not in data["models"][model]
    pairs = {(t["inverted_by"], t["scored_by"]) for t in data["transfer"]}
    assert pairs == {(a, b) for a in ok for b in ok} and {t["concept"] for t in data["transfer"]} == {"direct"}
    assert all(0 <= t["p_target"] <= 1 and 0 <= t["names_target"] <= 1 for t in data["transfer"])
    assert (folder / "grid.png").is_file() and "Transfer" in (folder / "report.html").read_text()
    assert not (in_tmp / "cmp.partial").exists()


def test_missing_inputs_of_every_model_are_named_at_once_before_any_work(tiny_checkpoint, in_tmp):
    args = ["compare", "--models", "llava-llama3,qwen2-vl", "--outputs", "cmp", "--question", "What is in the image?",
            "--answer", "a red circle", "--iterations", "2", "--checkpoint", f"llava-llama3={tiny_checkpoint}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error:")
    # the same policy as `mimic invert`: missing statistics are an error, not a silently weaker objective
    assert "llava-llama3: the feature-statistics term needs --stats" in line
    assert "qwen2-vl: the feature-statistics term needs --stats" in line and "qwen2-vl' needs --checkpoint" in line
    assert not (in_tmp / "cmp").exists() and not (in_tmp / "cmp.partial").exists()


TWO = ["compare", "--models", "toy-shapes,llava-llama3", "--outputs", "cmp", "--question", "What is in the image?",
       "--answer", "a red circle", "--iterations", "2", "--batch-size", "1", "--scale", "feature=0"]


def two(tiny_checkpoint, *more):
    return CliRunner().invoke(app, [*TWO, "--checkpoint", f"llava-llama3={tiny_checkpoint}", *more])


def failing_for(model, exc, original):
    def call(registry, name, config, *args, **kwargs):
        if name == model:
            raise exc
        return original(registry, name, config, *args, **kwargs)
    return call


@pytest.mark.parametrize("exc", [ValueError("bad header"), KeyError("weight")])
def test_any_failure_of_one_model_leaves_the_others(tiny_checkpoint, in_tmp, monkeypatch, exc):
    import mimic_toolkit.compare as compare

    monkeypatch.setattr(compare, "_run_model", failing_for("llava-llama3", exc, compare._run_model))
    result = two(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    data = json.loads((in_tmp / "cmp" / "comparison.json").read_text())
    assert data["models"]["llava-llama3"]["error"].startswith(type(exc).__name__)
    assert "error" not in data["models"]["toy-shapes"] and (in_tmp / "cmp" / "toy-shapes" / "c0" / "report.html").is_file()
    assert result.stderr.strip().splitlines()[-1] == "failed: llava-llama3 (see the report)"


def test_a_rerun_after_a_stopped_comparison_keeps_the_finished_runs(tiny_checkpoint, in_tmp, monkeypatch):
    import mimic_toolkit.compare as compare

    original = compare._run_model
    monkeypatch.setattr(compare, "_run_model", failing_for("llava-llama3", KeyboardInterrupt(), original))
    assert two(tiny_checkpoint).exit_code != 0  # Ctrl-C stops the whole comparison
    kept = (in_tmp / "cmp.partial" / "toy-shapes" / "c0" / "images" / "00.png").read_bytes()
    monkeypatch.setattr(compare, "_run_model", original)
    result = two(tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert "toy-shapes c0 (1/1): finished earlier, kept" in result.stderr
    assert (in_tmp / "cmp" / "toy-shapes" / "c0" / "images" / "00.png").read_bytes() == kept
    assert len(json.loads((in_tmp / "cmp" / "comparison.json").read_text())["transfer"]) == 4


def test_a_judge_that_fails_is_noted_and_the_others_score(tiny_checkpoint, in_tmp, monkeypatch):
    import mimic_toolkit.compare as compare

    original = compare._judge
    monkeypatch.setattr(compare, "_judge", lambda registry, judge, *args: (_ for _ in ()).throw(KeyError("lm_head"))
                        if judge == "llava-llama3" else original(registry, judge, *args))
    result = two(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    data = json.loads((in_tmp / "cmp" / "comparison.json").read_text())
    assert data["models"]["llava-llama3"]["scoring_error"] == "KeyError: 'lm_head'"
    assert {(t["inverted_by"], t["scored_by"]) for t in data["transfer"]} == {
        ("toy-shapes", "toy-shapes"), ("llava-llama3", "toy-shapes")}
    assert "scoring failed: KeyError" in (in_tmp / "cmp" / "report.html").read_text()


def test_a_kept_run_of_other_settings_is_refused_not_removed(tiny_checkpoint, in_tmp):
    run = in_tmp / "cmp.partial" / "toy-shapes" / "c0"
    result = CliRunner().invoke(app, ["invert", "--iterations", "3", "--batch-size", "1", "--scale", "feature=0",
                                      "--question", "What is in the image?", "--answer", "a red circle",
                                      "--outputs", run, "--quiet"])
    assert result.exit_code == 0, result.output
    before = (run / "checkpoint.safetensors").read_bytes()
    result = two(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    error = json.loads((in_tmp / "cmp" / "comparison.json").read_text())["models"]["toy-shapes"]["error"]
    assert "made with other settings (iterations" in error and "remove it to run the model again" in error
    assert (in_tmp / "cmp" / "toy-shapes" / "c0" / "checkpoint.safetensors").read_bytes() == before
    assert yaml.safe_load((in_tmp / "cmp" / "toy-shapes" / "c0" / "config.yaml").read_text())["iterations"] == 3


def test_a_rerun_resumes_an_interrupted_model_run(tiny_checkpoint, in_tmp):
    from mimic_toolkit.registry import build_registry
    from mimic_toolkit.session import Interrupted, build_config, run_inversion

    registry = build_registry()
    prompts = registry.adapter_spec("toy-shapes").prompts  # compare gives every model the one prompt file
    config = build_config(registry, {"model": "toy-shapes", "question": "What is in the image?", "answer": "a red circle",
                                     "iterations": 2, "batch_size": 1, "scales": {"feature": 0.0}, "prompts": prompts,
                                     "outputs": str(in_tmp / "cmp.partial" / "toy-shapes" / "c0")})
    with pytest.raises(Interrupted):
        run_inversion(registry, config, stop_requested=lambda: True)  # stops after step 1
    result = two(tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert "toy-shapes c0 (1/1): resuming" in result.stderr
    steps = [json.loads(line)["step"] for line in
             (in_tmp / "cmp" / "toy-shapes" / "c0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


SEVERAL = ["compare", "--models", "toy-shapes,toy,llava-llama3", "--classes", "0,7", "--iterations", "2",
           "--batch-size", "1", "--scale", "feature=0"]


@pytest.fixture(scope="module")
def several(tiny_checkpoint, tmp_path_factory):
    """Two concepts of the toy's prompt file on the toy and the tiny LLaVA (an alias of the toy too)."""
    folder = tmp_path_factory.mktemp("several") / "cmp"
    result = CliRunner().invoke(app, [*SEVERAL, "--outputs", folder, "--checkpoint", f"llava-llama3={tiny_checkpoint}"])
    return folder, result


def test_several_concepts_one_definition_a_grid_transfer_per_concept_and_averaged(several):
    folder, result = several
    assert result.exit_code == 0, result.output
    assert "toy: the same model as toy-shapes, merged" in result.stderr  # an alias is not run twice
    assert "llava-llama3 c7 (2/2): inverting" in result.stderr and "scoring with llava-llama3 (2/2)" in result.stderr
    data = json.loads((folder / "comparison.json").read_text())
    assert list(data["models"]) == ["toy-shapes", "llava-llama3"] and list(data["concepts"]) == ["c0", "c7"]
    # one concept definition: class 7 is the toy's green square for the LLaVA too, not ImageNet's class 7
    manifest = json.loads((folder / "llava-llama3" / "c7" / "manifest.json").read_text())
    assert manifest["concept"]["target"] == "a green square"
    assert data["models"]["llava-llama3"]["runs"] == {"c0": "llava-llama3/c0", "c7": "llava-llama3/c7"}
    cells = {(t["concept"], t["inverted_by"], t["scored_by"]): t for t in data["transfer"]}
    assert len(cells) == 8
    for mean in data["transfer_mean"]:
        pair = (mean["inverted_by"], mean["scored_by"])
        per_concept = [cells[(c, *pair)]["p_target"] for c in ("c0", "c7")]
        assert mean["concepts"] == 2 and mean["p_target"] == pytest.approx(sum(per_concept) / 2)
    assert data["how"]["settings"] == "per model"
    report = (folder / "report.html").read_text()
    assert "each model&#x27;s own defaults" in report or "each model's own defaults" in report
    assert "Transfer per concept" in report and "c7: green square" in report
    from PIL import Image
    assert Image.open(folder / "grid.png").size[0] > 2 * 128  # two concept columns after the labels


def test_the_toy_verifier_scores_every_models_images_of_its_concepts(several):
    import torch
    from PIL import Image

    from mimic_plugins.toy_shapes.verifier import score_concept
    from mimic_toolkit.adapter.vision import image_tensor

    folder, result = several
    data = json.loads((folder / "comparison.json").read_text())
    verdicts = {(v["model"], v["concept"]): v for v in data["verifier"]}
    assert set(verdicts) == {(m, c) for m in ("toy-shapes", "llava-llama3") for c in ("c0", "c7")}
    images = torch.stack([image_tensor(Image.open(p).convert("RGB"))
                          for p in sorted((folder / "llava-llama3" / "c7" / "images").glob("*.png"))])
    expected = score_concept(images, 7, "green square")  # 32 px images of the tiny LLaVA, resized for the verifier
    assert {k: verdicts[("llava-llama3", "c7")][k] for k in expected} == expected
    mean = data["models"]["toy-shapes"]["verifier"]
    assert mean["colour"] == pytest.approx((verdicts[("toy-shapes", "c0")]["colour"]
                                            + verdicts[("toy-shapes", "c7")]["colour"]) / 2)
    assert "Verifier accuracy" in (folder / "report.html").read_text()


def test_the_toy_verifier_knows_its_concepts_and_no_others():
    from mimic_plugins.toy_shapes import shapes
    from mimic_plugins.toy_shapes.verifier import score_concept

    images, labels = shapes.sample((5, 99), 48)
    reds = images[labels == 0]
    assert len(reds) and score_concept(reds, 0, "red circle")["both"] >= 0.9  # generated truth is recognised
    assert score_concept(reds, 7, "green square")["both"] == 0.0
    assert score_concept(reds, 0, "tench") is None and score_concept(reds, 24, "red circle") is None


def test_runs_made_elsewhere_give_the_same_comparison(several, tmp_path):
    folder, _ = several
    result = CliRunner().invoke(app, ["compare", "--runs", str(folder / "toy-shapes"), str(folder / "llava-llama3"),
                                      "--outputs", tmp_path / "again"])
    assert result.exit_code == 0, result.output
    first = json.loads((folder / "comparison.json").read_text())
    again = json.loads((tmp_path / "again" / "comparison.json").read_text())
    assert again["concepts"] == first["concepts"] and again["how"]["settings"] == "as each run was made"
    key = lambda t: (t["concept"], t["inverted_by"], t["scored_by"])
    assert sorted(map(key, again["transfer"])) == sorted(map(key, first["transfer"]))
    by_key = {key(t): t for t in first["transfer"]}
    for t in again["transfer"]:
        assert t["p_target"] == pytest.approx(by_key[key(t)]["p_target"], rel=1e-5)
        assert t["names_target"] == by_key[key(t)]["names_target"]
    assert again["verifier"] == first["verifier"]


@pytest.mark.parametrize("args, message", [
    (["--runs", "nowhere"], "'nowhere' is neither a run folder nor a folder of runs"),
    (["--runs", ".", "--models", "toy-shapes"], "--runs scores existing runs: --models does not apply"),
    (["--runs", ".", "--iterations", "3"], "--runs scores existing runs: --iterations does not apply"),
    (["--models", "toy-shapes", "--classes", "0,x"], "--classes takes comma-separated integers or 'all'"),
    (["--models", "toy-shapes", "--classes", "0,99"], "class index 99 is not in prompt file"),
    (["--models", "toy-shapes", "--classes", "0,1"], "the statistics file"),
])
def test_bad_comparison_inputs_are_one_line(in_tmp, args, message):
    from mimic_toolkit.registry import build_registry

    if "0,1" in args:  # one statistics file for two concepts
        stats = next(iter(sorted(__import__("pathlib").Path(build_registry().adapter_spec("toy-shapes").stats).glob("*"))))
        args = [*args, "--stats", f"toy-shapes={stats}"]
    result = CliRunner().invoke(app, ["compare", "--outputs", "cmp", *args])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error:") and message in line
    assert not (in_tmp / "cmp").exists() and not (in_tmp / "cmp.partial").exists()


def test_every_model_failing_still_writes_the_report_and_exits_1(tiny_checkpoint, in_tmp, monkeypatch):
    import mimic_toolkit.compare as compare

    monkeypatch.setattr(compare, "_run_model", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no memory")))
    result = two(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == "failed: toy-shapes, llava-llama3 (see the report)"
    data = json.loads((in_tmp / "cmp" / "comparison.json").read_text())
    assert all(r["error"] == "RuntimeError: no memory" for r in data["models"].values()) and data["transfer"] == []


def test_same_settings_gives_every_model_the_first_models(tiny_checkpoint, in_tmp):
    result = two(tiny_checkpoint, "--same-settings")
    assert result.exit_code == 0, result.output
    toy = yaml.safe_load((in_tmp / "cmp" / "toy-shapes" / "c0" / "config.yaml").read_text())
    llava = yaml.safe_load((in_tmp / "cmp" / "llava-llama3" / "c0" / "config.yaml").read_text())
    for key in ("lr", "parameterisation", "feature_form", "jitter", "scales"):
        assert llava[key] == toy[key], key
    assert llava["checkpoint"] != toy["checkpoint"]
    data = json.loads((in_tmp / "cmp" / "comparison.json").read_text())
    assert data["how"] == {**data["how"], "settings": "shared", "settings_from": "toy-shapes"}
    assert "shared: toy-shapes" in (in_tmp / "cmp" / "report.html").read_text()


@pytest.mark.slow
def test_one_process_per_model_gives_the_sequential_report(tiny_checkpoint, in_tmp):
    sequential = two(tiny_checkpoint)
    assert sequential.exit_code == 0, sequential.output
    (in_tmp / "cmp").rename(in_tmp / "sequential")
    parallel = two(tiny_checkpoint, "--processes", "2")
    assert parallel.exit_code == 0, parallel.output
    assert "toy-shapes: in a process of its own" in parallel.stderr
    first = json.loads((in_tmp / "sequential" / "comparison.json").read_text())
    second = json.loads((in_tmp / "cmp" / "comparison.json").read_text())
    assert second["how"]["processes"] == 2 and first["how"]["processes"] == 1
    assert [(t["concept"], t["inverted_by"], t["scored_by"]) for t in second["transfer"]] == [
        (t["concept"], t["inverted_by"], t["scored_by"]) for t in first["transfer"]]
    assert {m: r["settings"] for m, r in second["models"].items()} == {m: r["settings"] for m, r in first["models"].items()}
    for a, b in zip(first["transfer"], second["transfer"]):
        assert b["p_target"] == pytest.approx(a["p_target"], rel=1e-4) and b["names_target"] == a["names_target"]
    for model in ("toy-shapes", "llava-llama3"):
        for image in (in_tmp / "sequential" / model / "c0" / "images").glob("*.png"):
            assert (in_tmp / "cmp" / model / "c0" / "images" / image.name).read_bytes() == image.read_bytes()
