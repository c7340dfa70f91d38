"""Plugin discovery: entry points, isolation of broken plugins, clashes, selection, listing."""
import inspect
import json
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from mimic_toolkit import cli, hookspecs, registry  # cli first: its import registers plugin commands
from mimic_toolkit.errors import UserError

PLUGIN = textwrap.dedent('''
    from mimic_toolkit import AdapterSpec, ObjectiveSpec, hookimpl

    @hookimpl
    def register_adapters(register):
        register(AdapterSpec(id="{id}", adapter="nowhere:Nothing", resolution=64))

    def darkness(ctx):
        return ctx.pixels.mean()

    @hookimpl
    def register_objectives(register):
        register(ObjectiveSpec(name="darkness", term=darkness))
''')


@pytest.fixture
def plugin_modules(tmp_path, monkeypatch):
    """Write plugin modules and expose them as entry points of the mimic_toolkit group."""
    monkeypatch.syspath_prepend(str(tmp_path))
    points = list(registry.entry_points(group=registry.ENTRY_POINT_GROUP))

    def add(name, source=None, value=None):
        if source is not None:
            (tmp_path / f"{name}.py").write_text(source)
        points.append(EntryPoint(name=name, value=value or name, group=registry.ENTRY_POINT_GROUP))

    monkeypatch.setattr(registry, "entry_points", lambda group: [p for p in points if p.group == group])
    return add


def test_builtin_adapter_registers_through_the_entry_point_group():
    spec = registry.build_registry().adapter_spec("llava-llama3")
    assert spec.plugin == "llava_llama3"  # the entry point's name: same path as a third party
    assert spec.resolution == 336


def test_third_party_plugin_adds_an_adapter_and_an_objective(plugin_modules):
    plugin_modules("extra_plugin", PLUGIN.format(id="extra-model"))
    reg = registry.build_registry()
    assert reg.adapter_spec("extra-model").plugin == "extra_plugin"
    assert "darkness" in reg.objective_specs()
    assert ("extra_plugin", ["register_adapters", "register_objectives"]) in reg.plugins()


def test_a_broken_plugin_is_one_warning_and_the_rest_still_works(plugin_modules, capsys, monkeypatch):
    monkeypatch.delenv("MIMIC_STRICT_PLUGINS", raising=False)
    plugin_modules("broken_plugin", "raise RuntimeError('boom')\n")
    reg = registry.build_registry()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken_plugin" in err[0] and "boom" in err[0] and err[0].startswith("warning:")
    assert reg.adapter_spec("llava-llama3")


def test_strict_mode_makes_a_broken_plugin_an_error(plugin_modules, monkeypatch):
    monkeypatch.setenv("MIMIC_STRICT_PLUGINS", "1")
    plugin_modules("broken_plugin", "raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="broken_plugin"):
        registry.build_registry()


def test_two_providers_of_one_model_id_is_an_error_naming_both_when_used(plugin_modules, capsys):
    plugin_modules("first_plugin", PLUGIN.format(id="same-model").replace("darkness", "dark1"))
    plugin_modules("second_plugin", PLUGIN.format(id="same-model").replace("darkness", "dark2"))
    reg = registry.build_registry()
    assert reg.adapter_spec("llava-llama3")  # every other model stays usable
    with pytest.raises(UserError) as info:
        reg.adapter_spec("same-model")
    assert "first_plugin" in str(info.value) and "second_plugin" in str(info.value)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "first_plugin" in warning[0] and "second_plugin" in warning[0]


def test_a_plugin_cannot_silently_replace_a_built_in_model(plugin_modules, capsys):
    plugin_modules("impostor", PLUGIN.format(id="llava-llama3"))
    reg = registry.build_registry()
    spec = reg.adapter_spec("llava-llama3")
    assert spec.plugin == "llava_llama3" and spec.adapter.startswith("mimic_plugins.")
    warning = capsys.readouterr().err
    assert "impostor" in warning and "built-in is kept" in warning


def test_models_are_listed_in_a_stable_order_built_ins_first(plugin_modules):
    plugin_modules("extra_plugin", PLUGIN.format(id="extra-model"))
    orders = {tuple(registry.build_registry().adapter_specs()) for _ in range(3)}
    assert len(orders) == 1
    (order,) = orders
    assert order[-1] == "extra-model" and {"llava-llama3", "qwen2-vl", "idefics2", "toy-shapes"} <= set(order[:-1])
    built = registry.build_registry()
    assert all(built.is_builtin(built.adapter_specs()[model].plugin) for model in order[:-1])


def test_registration_goes_through_pluggy_so_tryfirst_orders_the_listing(plugin_modules):
    plugin_modules("early_plugin", PLUGIN.format(id="early-model").replace("@hookimpl\ndef register_adapters",
                                                                            "@hookimpl(tryfirst=True)\ndef register_adapters"))
    plugin_modules("late_plugin", PLUGIN.format(id="late-model").replace("darkness", "dark2"))
    order = list(registry.build_registry().adapter_specs())
    assert order.index("early-model") < order.index("late-model")


def test_load_plugins_env_loads_only_the_named_ones(plugin_modules, monkeypatch):
    plugin_modules("extra_plugin", PLUGIN.format(id="extra-model"))
    monkeypatch.setenv("MIMIC_LOAD_PLUGINS", "extra_plugin")
    specs = registry.build_registry().adapter_specs()
    assert list(specs) == ["extra-model"]


def _one_warning(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:"), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def _models_still_work(reg):
    from typer.testing import CliRunner

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "default_registry", lambda: reg)
        result = CliRunner().invoke(cli.app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    assert "llava-llama3" in [m["id"] for m in json.loads(result.stdout)]


BROKEN = {  # kind -> (plugin source, what its one warning names)
    "misspelled_hook": ("from mimic_toolkit import hookimpl\n@hookimpl\ndef register_adapter(register):\n    pass\n",
                        "register_adapter"),
    "hook_raises": ("from mimic_toolkit import hookimpl\n@hookimpl\ndef register_adapters(register):\n"
                    "    raise RuntimeError('boom')\n", "register_adapters"),
    "exit_at_import": ("import sys\nsys.exit(3)\n", "SystemExit(3)"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_each_broken_plugin_kind_is_one_warning_and_mimic_models_works(kind, plugin_modules, capsys, monkeypatch):
    monkeypatch.delenv("MIMIC_STRICT_PLUGINS", raising=False)
    source, names = BROKEN[kind]
    plugin_modules(f"broken_{kind}", source)  # a module name per kind: imports are cached
    reg = registry.build_registry()
    reg.adapter_specs()
    _one_warning(capsys, f"broken_{kind}", names)
    assert not reg.manager.has_plugin(f"broken_{kind}") and reg.manager.has_plugin("core")
    _models_still_work(reg)
    assert capsys.readouterr().err == ""  # reported once, not on every listing


@pytest.mark.parametrize("kind", BROKEN)
def test_strict_mode_makes_each_broken_plugin_kind_an_error(kind, plugin_modules, monkeypatch):
    monkeypatch.setenv("MIMIC_STRICT_PLUGINS", "1")
    plugin_modules(f"strict_{kind}", BROKEN[kind][0])
    with pytest.raises(UserError, match=f"strict_{kind}"):
        registry.build_registry().adapter_specs()


def test_a_plugin_that_registers_then_raises_contributes_nothing(capsys, monkeypatch):
    from mimic_toolkit import AdapterSpec, hookimpl

    monkeypatch.delenv("MIMIC_STRICT_PLUGINS", raising=False)

    class HalfWay:
        @hookimpl
        def register_adapters(self, register):
            register(AdapterSpec(id="half-model", adapter="nowhere:Nothing", resolution=64))
            raise ValueError("second one failed")

    reg = registry.build_registry({"halfway": HalfWay()})
    assert "half-model" not in reg.adapter_specs()
    _one_warning(capsys, "halfway", "register_adapters", "second one failed")


def test_a_failing_register_commands_adds_no_commands_and_the_cli_works(capsys, monkeypatch):
    from mimic_toolkit import hookimpl

    monkeypatch.delenv("MIMIC_STRICT_PLUGINS", raising=False)

    def half_added():
        pass

    class Commands:
        @hookimpl
        def register_commands(self, cli):
            cli.command()(half_added)
            raise RuntimeError("no commands today")

    reg = registry.build_registry({"commands": Commands()})
    monkeypatch.setattr(cli.app, "registered_commands", list(cli.app.registered_commands))  # restored after
    monkeypatch.setattr(cli, "default_registry", lambda: reg)
    cli._register_plugin_commands()
    assert all(command.callback is not half_added for command in cli.app.registered_commands)
    _one_warning(capsys, "commands", "register_commands", "no commands today")
    _models_still_work(reg)


def test_load_plugins_naming_no_plugin_warns_and_says_no_model_is_registered(monkeypatch, capsys):
    monkeypatch.delenv("MIMIC_STRICT_PLUGINS", raising=False)
    monkeypatch.setenv("MIMIC_LOAD_PLUGINS", "nosuchplugin")
    reg = registry.build_registry()
    _one_warning(capsys, "nosuchplugin", "toy_shapes")  # the installed ones are listed
    for ask in (lambda: reg.adapter_spec("toy-shapes"), reg.default_model):
        with pytest.raises(UserError, match="no model is registered: .*MIMIC_LOAD_PLUGINS"):
            ask()


def test_unknown_model_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'llava-llama3'"):
        registry.build_registry().adapter_spec("llava-lama3")


def test_every_hookspec_is_documented_with_an_example():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith(("register_", "mimic_"))]
    assert len(specs) == 8
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert "Example" in doc and "@hookimpl" in doc, spec.__name__
        if spec.__name__.startswith("mimic_"):  # the engine's questions: contracts in pytest's form
            assert "first non-None result" in doc and ":return:" in doc, spec.__name__


def test_every_hookspec_example_is_a_working_plugin():
    """Each example compiles and, registered as a plugin, passes pluggy's signature check."""
    import pluggy

    for name, spec in inspect.getmembers(hookspecs, inspect.isfunction):
        doc = inspect.getdoc(spec) or ""
        if "Example" not in doc:
            continue
        code = textwrap.dedent(doc.split("::", 1)[1].split("\nand in ", 1)[0])  # not the pyproject part
        module = {}
        exec(compile(code, f"<{name} example>", "exec"), module)
        plugin = type("Example", (), {k: staticmethod(v) for k, v in module.items() if hasattr(v, "mimic_toolkit_impl")})
        manager = pluggy.PluginManager(registry.ENTRY_POINT_GROUP)
        manager.add_hookspecs(hookspecs)
        manager.register(plugin)
        manager.check_pending()
        assert manager.get_hookcallers(plugin), name


def test_listing_models_imports_neither_torch_nor_transformers():
    code = ("import sys, json; from typer.testing import CliRunner; from mimic_toolkit.cli import app; "
            "r = CliRunner().invoke(app, ['models', '--json']); assert r.exit_code == 0, r.output; "
            "ids = [m['id'] for m in json.loads(r.output)]; "
            "print(json.dumps([ids, 'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ids, torch_loaded, transformers_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "llava-llama3" in ids
    assert not torch_loaded and not transformers_loaded
