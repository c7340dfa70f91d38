"""The bundled toy-shapes model as the default: `mimic invert` with no arguments, the shipped
statistics, `mimic evaluate`, and an inversion that moves the verifier towards the target."""
import json

from typer.testing import CliRunner

from mimic_plugins.toy_shapes import shapes, verifier
from mimic_toolkit.cli import app
from mimic_toolkit.engine import format_prompt, load_model
from mimic_toolkit.features import FeatureStats
from mimic_toolkit.inversion import build_inversion
from mimic_toolkit.registry import build_registry
from mimic_toolkit.session import build_config

runner = CliRunner()


def test_invert_without_arguments_runs_the_bundled_model(in_tmp):
    result = runner.invoke(app, ["invert"])
    assert result.exit_code == 0, result.output
    runs = list((in_tmp / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("toy-shapes-c0-")
    assert (runs[0] / "report.html").is_file() and "report:" in result.output
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["concept"]["target"] == "a red circle"
    assert "feature" in json.loads((runs[0] / "metrics.jsonl").read_text().splitlines()[-1])["terms"]


def test_shipped_statistics_cover_every_concept_and_match_the_model():
    registry = build_registry()
    spec = registry.adapter_spec("toy-shapes")
    adapter = load_model("toy-shapes", device="cpu", registry=registry)
    for index in range(24):
        FeatureStats.find(spec.stats, spec.id, index).check_matches(adapter, spec.id, 64)


def test_a_short_inversion_raises_the_verifiers_probability_of_the_target_colour():
    registry = build_registry()
    config = build_config(registry, {"iterations": 60, "seed": 0})
    config.resolution = 64
    adapter = load_model("toy-shapes", device="cpu", registry=registry)
    index = shapes.class_index("circle", "blue")
    prompt = format_prompt(adapter, [(shapes.DEFAULT_QUESTION, "a blue circle")])
    stats = FeatureStats.find(adapter.spec.stats, "toy-shapes", index)
    classifier = verifier.load_verifier()
    colour = shapes.COLOURS.index("blue")
    with build_inversion(registry, adapter, prompt, config, stats) as inversion:
        before = verifier.predict(adapter.denormalise(inversion.images.detach()), classifier)[1][:, colour].mean()
        for _ in range(config.iterations):
            inversion.run_step()
        after = verifier.predict(adapter.denormalise(inversion.images.detach()), classifier)[1][:, colour].mean()
    assert after > before + 0.3, (before, after)


def test_evaluate_scores_a_toy_run(in_tmp):
    result = runner.invoke(app, ["invert", "--class-index", "9", "--iterations", "3", "--quiet", "--outputs", "run"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    row = report["runs"][0]
    assert row["class_index"] == 9 and row["images"] == 4
    for key in ("shape_top1", "colour_top1", "both_top1", "vlm_p_shape", "vlm_p_colour"):
        assert 0.0 <= row[key] <= 1.0
    assert report["summary"]["runs"] == 1


def test_evaluate_refuses_folders_that_are_not_runs(in_tmp):
    (in_tmp / "empty").mkdir()
    result = runner.invoke(app, ["evaluate", "empty"])
    assert result.exit_code == 2 and "neither a run folder nor a sweep folder" in result.stderr


def test_answer_probability_is_high_for_real_images_and_low_for_wrong_answers():
    from mimic_plugins.toy_shapes.evaluation import answer_probability

    adapter = load_model("toy-shapes", device="cpu")
    images, labels = shapes.sample(7, 8)
    right = [answer_probability(adapter, images[i:i + 1], "What colour is the shape?",
                                shapes.split_class(int(labels[i]))[1]).item() for i in range(8)]
    wrong = [answer_probability(adapter, images[i:i + 1], "What colour is the shape?",
                                shapes.COLOURS[(shapes.COLOURS.index(shapes.split_class(int(labels[i]))[1]) + 1) % 6]).item()
             for i in range(8)]
    assert min(right) > 0.5 and max(wrong) < 0.1
