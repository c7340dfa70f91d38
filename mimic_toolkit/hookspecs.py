"""The hooks a plugin implements. A plugin is a module with `@hookimpl` functions plus an entry
point in the `mimic_toolkit` group; the built-in adapters under `plugins/` use exactly this path.

Two kinds of hook:
- registration (`register_adapters`, `register_objectives`, `register_guides`, `register_commands`):
  each plugin's implementation is called once and calls `register` once per thing it provides.
  Records are plain frozen dataclasses (`AdapterSpec`, `ObjectiveSpec`, `GuideSpec`), so listing
  never imports torch.
- the engine's questions (`mimic_load_model`, `mimic_vision_sites`, `mimic_format_prompt`): asked
  whenever the core needs the answer, they stop at the first non-None result. The core's own
  answer (`mimic_toolkit/builtin.py`) is an implementation like any other, marked `trylast`, so a
  plugin's answer comes first; a plugin returns None for the models it leaves alone.
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

    A term is a function `(ctx: StepContext) -> scalar tensor` (`mimic_toolkit.terms.StepContext`);
    its scale is set with `--scale NAME=VALUE` or `scales: {NAME: VALUE}` in a config file, and
    it is off while its scale is 0. `reads=("vision_statistics",)` (or "answer", "lm_objective")
    declares what it looks at beyond the pixels, so the engine records that for it. Example::

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
def register_guides(register):
    """Register guide networks for the `guide` term (R_V, DeepInversion's BatchNorm prior) by
    calling `register(GuideSpec(...))` once per network.

    A guide is a CNN with BatchNorm layers; the term matches the batch's per-channel mean and
    variance at each BatchNorm input to that layer's running statistics. `builder` names a callable
    that returns the module (imported only when a run uses it); its weights come from a safetensors
    file of its state dict (`weights`, or the user's `--guide-weights`). A run picks one with
    `--guide ID` (or the model's defaults, `guide: ID`). Example::

        from mimic_toolkit import GuideSpec, hookimpl

        @hookimpl
        def register_guides(register):
            register(GuideSpec(
                id="my-resnet18",
                builder="my_plugin.guides:resnet18",          # () -> torch.nn.Module
                weights="/models/resnet18-imagenet.safetensors",
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                input_size=224,
                description="ResNet-18, ImageNet",
            ))
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


@hookspec(firstresult=True)
def mimic_load_model(spec, source, options):
    """Load model `spec` from `source` and return its adapter, or None to leave it to the next
    implementation. Stops at the first non-None result.

    :param AdapterSpec spec: the model asked for (`spec.id`; `spec.load_class()`: its adapter class).
    :param str source: a local checkpoint folder or a hub id (the user's `--checkpoint`, else the
        model's own).
    :param LoadOptions options: dtype, device, device_map, revision, trust_remote_code.
    :return: a `VLMAdapter` with frozen weights on `options.device` (or placed by the device map).
        The core's default: `spec.load_class().load(source, **options.as_kwargs(), spec=spec)`.

    A plugin takes over loading (a quantised or offloaded load, a model cache, another backend)
    without subclassing the adapter. Example: LLaVA-Llama-3 loaded in 4 bits::

        from mimic_toolkit import hookimpl

        @hookimpl
        def mimic_load_model(spec, source, options):
            if spec.id != "llava-llama3":
                return None
            import transformers

            adapter_class = spec.load_class()
            model = transformers.LlavaForConditionalGeneration.from_pretrained(
                source, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True),
                device_map="auto")
            return adapter_class(model, adapter_class.load_tokenizer(source), spec=spec)
    """


@hookspec(firstresult=True)
def mimic_vision_sites(adapter, selection):
    """Which vision-tower modules feed the feature statistics, or None to leave it to the next
    implementation. Stops at the first non-None result.

    :param VLMAdapter adapter: the loaded model; `adapter.vision_sites()` maps every canonical site
        name (`vision.patch_embedding`, `vision.layers.{i}`, `vision.layers.{i}.attn`,
        `vision.layers.{i}.mlp`) to its module.
    :param str|None selection: the run's `feature_sites` setting (`--feature-sites`); None: the default.
    :return: {canonical name: module} in forward order. The core's default filters the adapter's
        sites by the selection (`mimic_toolkit.sites.select_sites`: globs, index ranges, `last:N`).

    Example: on Qwen2-VL, match every fourth block's MLP unless the user chose sites::

        from mimic_toolkit import hookimpl

        @hookimpl
        def mimic_vision_sites(adapter, selection):
            if adapter.model_id != "qwen2-vl" or selection is not None:
                return None
            return {name: module for name, module in adapter.vision_sites().items()
                    if name.endswith(".mlp") and int(name.split(".")[2]) % 4 == 3}
    """


@hookspec(firstresult=True)
def mimic_format_prompt(adapter, turns, target, image_turns):
    """Turn chat turns into the model's tokenised prompt, or None to leave it to the next
    implementation. Stops at the first non-None result.

    :param VLMAdapter adapter: the loaded model (`adapter.model_id`, `adapter.tokenizer`).
    :param list[tuple[str, str]] turns: [(user, assistant), ...]; the image goes at the start of the
        first user message, and the last assistant message is the target.
    :param bool target: False: leave the last assistant message out (a prompt to generate from).
    :param tuple[int, ...] image_turns: the turns whose user message carries an image, (0,) but for
        in-context demonstrations; pass it on as `build_prompt(..., image_turns=image_turns)`.
    :return: a `Prompt`. The core's default is `adapter.build_prompt(turns, target)`, the adapter's
        own chat template; `build_prompt` also takes `chat_template=` and `system=`, so a plugin
        changes the format of a model family without subclassing its adapter.

    Example: LLaVA-1.5's Vicuna format on the LLaVA adapter (`examples/adapter-plugin`)::

        from mimic_toolkit import hookimpl

        VICUNA = ("{{ bos_token }}{% for message in messages %}{{ message['role'] | upper }}: "
                  "{{ message['content'] }} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")

        @hookimpl
        def mimic_format_prompt(adapter, turns, target, image_turns):
            if adapter.model_id == "llava-1.5-7b":
                return adapter.build_prompt(turns, target, chat_template=VICUNA, image_turns=image_turns)
    """


@hookspec(firstresult=True)
def mimic_verify_images(images, concept):
    """Score images of a concept with an independent judge (a classifier that is not the VLM), or
    None when this plugin has no verifier for the concept. Stops at the first non-None result.

    :param torch.Tensor images: [B, 3, H, W] in [0, 1], the images of one run (e.g. inverted ones).
    :param Concept concept: `class_index`, `class_name`, `chat_sequence` (`mimic_toolkit.prompts`).
    :return: {score name: fraction of the images the judge finds right}, e.g. {"shape": 0.75}.
        `mimic compare` reports each model's mean per score, over the concepts that have a verifier,
        and every run's report shows its verdict on the final images.

    The bundled toy's shape-and-colour CNN (`mimic_plugins/toy_shapes/plugin.py`) answers for the
    24 concepts of its prompt file, recognised by their names. Example (a judge of redness)::

        from mimic_toolkit import hookimpl

        @hookimpl
        def mimic_verify_images(images, concept):
            if concept.class_name != "red":
                return None                     # other concepts: another plugin's, or nobody's
            red = images[:, 0] > images[:, 1:].max(1).values + 0.2
            return {"red pixels > half": float((red.float().mean((1, 2)) > 0.5).float().mean())}
    """
