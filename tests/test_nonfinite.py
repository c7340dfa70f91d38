"""A loss that becomes non-finite mid-run stops it in one line naming the step and the term, and the
last finite checkpoint stays (issue 16). Checked only at steps that sync anyway: log steps and
checkpoints."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mimic_toolkit import ObjectiveSpec, cli, hookimpl
from mimic_toolkit.registry import build_registry

from test_faults import fails, invoke


def blowup_plugin(from_step: int):
    """A plugin term that is NaN from the `from_step`th step on (one call per step)."""
    calls = []

    def blowup(ctx):
        calls.append(1)
        return ctx.pixels.mean() * (float("nan") if len(calls) >= from_step else 0.0)

    class Plugin:
        @hookimpl
        def register_objectives(self, register):
            register(ObjectiveSpec(name="blowup", term=blowup))

    return Plugin()


@pytest.fixture
def run_with_blowup(monkeypatch, tmp_path):
    def run(from_step, *flags):
        registry = build_registry({"blowup": blowup_plugin(from_step)})
        monkeypatch.setattr(cli, "default_registry", lambda: registry)
        folder = tmp_path / "run"
        result = invoke("invert", "--iterations", "8", "--batch-size", "1", "--quiet", "--scale", "blowup=1",
                        "--outputs", folder, *flags)
        return result, folder.with_name("run.partial")
    return run


def test_detected_at_a_checkpoint_which_is_never_written_with_nan(run_with_blowup):
    result, partial = run_with_blowup(5, "--checkpoint-every", "2", "--log-every", "100")
    fails(result, "non-finite by step 6", "blowup", "last finite checkpoint is kept")
    checkpoint = next(partial.glob("checkpoint*.safetensors"))
    with safe_open(checkpoint, "pt") as f:
        assert f.metadata()["step"] == "4"  # the one before the failure
    assert torch.isfinite(load_file(checkpoint)["images"]).all()
    assert "NaN" not in (partial / "metrics.jsonl").read_text()


def test_detected_at_a_log_step_names_only_the_term_that_failed(run_with_blowup):
    result, partial = run_with_blowup(5, "--checkpoint-every", "100", "--log-every", "5")
    fails(result, "non-finite by step 5 (non-finite: blowup)", "no checkpoint was written yet")
    assert not partial.exists()  # nothing worth resuming
