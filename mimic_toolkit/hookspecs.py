"""The hooks a plugin implements. A plugin is a module with `@hookimpl` functions plus an entry
point in the `mimic_toolkit` group; the built-in adapters under `plugins/` use exactly this path.

Each hook receives a `register` callable and calls it once per thing it provides. Records are
plain frozen dataclasses (`AdapterSpec`, `ObjectiveSpec`) so listing never imports torch.
"""
import pluggy

hookspec = pluggy.HookspecMarker("mimic_toolkit")
hookimpl = pluggy.HookimplMarker("mimic_toolkit")


@hookspec
def register_adapters(register):
    """Register model adapters by calling `register(AdapterSpec(...))` once per model.

    The adapter class is named by a dotted path and imported only when the model is used, so
    `mimic models` stays fast and never imports torch. Example (a complete plugin module)::

        from mimic_toolkit import AdapterSpec, hookimpl

        @hookimpl
        def register_adapters(register):
            register(AdapterSpec(
                id="llava-1.5-7b",
                aliases=("llava15",),
                adapter="my_plugin.adapter:Llava15Adapter",
                resolution=336,
                defaults={"lr": 0.3, "iterations": 5000},
                description="LLaVA-1.5-7B (Vicuna template)",
            ))

    and in the plugin's pyproject.toml::

        [project.entry-points.mimic_toolkit]
        my_plugin = "my_plugin"
    """


@hookspec
def register_objectives(register):
    """Register extra objective terms by calling `register(ObjectiveSpec(...))`.

    A term is a function `(ctx: StepContext) -> scalar tensor` (see `mimic_toolkit.objectives`);
    its scale is set with `--scale NAME=VALUE` or `scales: {NAME: VALUE}` in a config file, and
    it is off while its scale is 0. Example::

        import torch
        from mimic_toolkit import ObjectiveSpec, hookimpl

        def mean_brightness(ctx):
            return -ctx.pixels.mean()          # pixels: the model's input, [B, 3, H, W], in [0, 1]

        @hookimpl
        def register_objectives(register):
            register(ObjectiveSpec(name="brightness", term=mean_brightness, default_scale=0.0,
                                   description="push images towards white"))
    """


@hookspec
def register_commands(cli):
    """Add commands to the `mimic` command line; `cli` is the root `typer.Typer` app. Example::

        import typer
        from mimic_toolkit import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello(name: str = "world"):
                "Say hello."
                typer.echo(f"hello {name}")
    """
