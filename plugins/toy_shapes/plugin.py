"""The bundled default model: `toy-shapes`, a small LLaVA trained here on generated shapes, so
`mimic invert` works out of the box and inversion quality can be measured against known truth.

Registered like any plugin. Its adapter is the LLaVA-Llama-3 adapter itself: the toy exercises
the same code path as the 8B model. Commands: `mimic toy train|train-verifier|stats` and
`mimic evaluate`.
"""
from pathlib import Path

from mimic_toolkit import AdapterSpec, hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="toy-shapes",
        aliases=("toy",),
        adapter="mimic_plugins.llava_llama3.adapter:LlavaLlama3Adapter",
        resolution=64,
        checkpoint=str(HERE / "checkpoint"),
        prompts=str(HERE / "prompts.json"),
        stats=str(HERE / "stats"),
        # Small model, small image: a few hundred steps suffice (benchmarks/RESULTS.md, "Toy-shapes
        # inversion quality": accuracy vs steps). The Fourier parameterisation and the KL form of the
        # feature statistics measured best there (colour recovered; shape is not, see RESULTS.md).
        defaults={"iterations": 300, "batch_size": 4, "lr": 0.05, "min_lr": 1e-4, "jitter": 4, "flip": True,
                  "parameterisation": "fourier", "feature_form": "kl",
                  "log_every": 25, "grid_every": 100, "checkpoint_every": 100,
                  "scales": {"main": 1.0, "feature": 0.01, "patch": 0.05, "tv_l1": 0.05, "tv_l2": 0.05, "l2": 0.0}},
        description="bundled 64 px shapes VLM (LLaVA layout, trained here); the default model",
        default=True,
        tested_transformers="5.17, 5.24",
    ))


@hookimpl
def register_commands(cli):
    from .commands import evaluate, toy

    cli.add_typer(toy, name="toy", help="Train and prepare the bundled toy-shapes model.")
    cli.command()(evaluate)
