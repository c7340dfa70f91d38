"""Finds plugins through the `mimic_toolkit` entry-point group and collects what they register.

One plugin that fails to import, fails validation (a misspelled hook) or raises in a registration
hook is reported in one warning line and skipped, so the CLI keeps working
(`MIMIC_STRICT_PLUGINS=1` makes it an error); `MIMIC_LOAD_PLUGINS=a,b` loads only those.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import replace
from functools import lru_cache
from importlib.metadata import entry_points

import pluggy

from . import builtin, hookspecs
from .errors import UserError
from .specs import AdapterSpec, GuideSpec, ObjectiveSpec

ENTRY_POINT_GROUP = "mimic_toolkit"


class Registry:
    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager
        self._warned: set[tuple[str, str]] = set()  # name clashes already reported
        self._contested: dict[str, tuple[AdapterSpec, AdapterSpec]] = {}  # claimed by two add-on plugins

    # -- plugins -----------------------------------------------------------------------------
    def plugins(self) -> list[tuple[str, list[str]]]:
        """(plugin name, hooks it implements) for every loaded plugin, built-ins first; a hook
        the plugin answers only as the last resort (`trylast`: the core's defaults) says "(default)"."""
        rows = []
        for plugin in self.manager.get_plugins():
            name = self.manager.get_name(plugin)
            hooks = []
            for caller in self.manager.get_hookcallers(plugin) or []:
                impl = next(i for i in caller.get_hookimpls() if i.plugin is plugin)
                hooks.append(caller.name + (" (default)" if impl.trylast else ""))
            rows.append((name, sorted(hooks)))
        return sorted(rows, key=lambda row: (not self.is_builtin(row[0]), row[0]))

    def implementers(self, hook_name: str) -> list:
        """The plugins implementing a hook, in pluggy's call order (tryfirst, then the rest, the
        built-ins last), so listings are stable."""
        caller = getattr(self.manager.hook, hook_name)
        return [impl.plugin for impl in reversed(caller.get_hookimpls()) if not impl.hookwrapper]

    def call(self, plugin, hook_name: str, **kwargs) -> bool:
        """Call one plugin's implementation of a hook. If it raises (or exits), that is one warning
        line and the plugin is unregistered, so False; the core's own failures are bugs and propagate."""
        return self._answer(plugin, hook_name, kwargs, passes_user_errors=False) is not _FAILED

    def ask(self, hook_name: str, **kwargs):
        """One of the engine's questions (a firstresult hook), asked plugin by plugin in pluggy's
        order: the first non-None answer wins, and a plugin whose answer raises is one warning line
        and left out, so the next one answers (in the end the core's default)."""
        for plugin in self.implementers(hook_name):
            answer = self._answer(plugin, hook_name, kwargs, passes_user_errors=True)
            if answer is not None and answer is not _FAILED:
                return answer
        return None

    def _answer(self, plugin, hook_name: str, kwargs: dict, *, passes_user_errors: bool):
        """One plugin's answer, or _FAILED. `passes_user_errors`: a UserError (an engine hook's word
        on bad input, such as a missing checkpoint) is the user's one line, not the plugin's fault."""
        others = [p for p in self.implementers(hook_name) if p is not plugin]
        name = self.manager.get_name(plugin)
        try:
            return self.manager.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)
        except (Exception, SystemExit) as exc:  # SystemExit: a plugin's sys.exit() must not end the CLI
            if name == "core" or (passes_user_errors and isinstance(exc, UserError)):
                raise
            self.manager.unregister(plugin)
            _plugin_failed(f"plugin '{name}' failed in {hook_name}: {_describe(exc)}", exc)
            return _FAILED

    def _collect(self, hook_name: str) -> list:
        """Call a registration hook one plugin at a time so that each record is tagged with its
        plugin's name; a plugin that fails contributes nothing, not even what it registered first."""
        records = []
        for plugin in self.implementers(hook_name):
            found = []
            if self.call(plugin, hook_name, register=found.append):
                records += [replace(r, plugin=self.manager.get_name(plugin)) for r in found]
        return records

    # -- adapters -----------------------------------------------------------------------------
    def adapter_specs(self) -> dict[str, AdapterSpec]:
        """Every registered model, built-ins first. A plugin may add models but never silently
        replace one: a built-in's name stays the built-in's, and a name two add-on plugins claim is
        refused when used (`adapter_spec`). Each clash is one warning line naming both plugins, and
        every other model stays usable."""
        records = sorted(self._collect("register_adapters"), key=lambda s: not self.is_builtin(s.plugin))
        specs: dict[str, AdapterSpec] = {}
        names: dict[str, AdapterSpec] = {}  # id or alias -> spec, to catch clashes
        for spec in records:
            clash = next((n for n in (spec.id, *spec.aliases) if n in names), None)
            if clash is None:
                names.update(dict.fromkeys((spec.id, *spec.aliases), spec))
                specs[spec.id] = spec
                continue
            other = names[clash]
            if not self.is_builtin(other.plugin):
                self._contested[clash] = (other, spec)
            if (spec.plugin, clash) not in self._warned:
                self._warned.add((spec.plugin, clash))
                kept = "the built-in is kept" if self.is_builtin(other.plugin) else \
                    f"--model {clash} is refused until one of them is uninstalled"
                print(f"warning: plugins '{other.plugin}' and '{spec.plugin}' both register model name '{clash}'; "
                      f"{kept} (`mimic_load_model` is the way to change how a model loads)", file=sys.stderr)
        return specs

    def is_builtin(self, plugin_name: str) -> bool:
        """The core and the plugins shipped in this package (entry points into `mimic_plugins`)."""
        plugin = self.manager.get_plugin(plugin_name)
        return plugin_name == "core" or getattr(plugin, "__name__", "").startswith("mimic_plugins.")

    def adapter_spec(self, name: str) -> AdapterSpec:
        specs = self.adapter_specs()
        if not specs:
            raise _no_models()
        if name in self._contested:
            first, second = self._contested[name]
            raise UserError(f"model name '{name}' is provided by two plugins: '{first.plugin}' ({first.id}) "
                            f"and '{second.plugin}' ({second.id}); uninstall one of them")
        for spec in specs.values():
            if name == spec.id or name in spec.aliases:
                return spec
        known = [n for s in specs.values() for n in (s.id, *s.aliases)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known models: {', '.join(sorted(specs))}"
        raise UserError(f"unknown model '{name}'{hint} (`mimic models` lists them)")

    def default_model(self) -> AdapterSpec:
        """The model commands use when none is named: the first that says `default=True`
        (built-ins come first)."""
        specs = self.adapter_specs()
        if not specs:
            raise _no_models()
        found = next((spec for spec in specs.values() if spec.default), None)
        if found is None:
            raise UserError("no model is marked as the default: name one with --model (`mimic models` lists them)")
        return found

    # -- objectives and guides ----------------------------------------------------------------
    def objective_specs(self) -> dict[str, ObjectiveSpec]:
        return self._unique("register_objectives", "name", "objective term")

    def guide_spec(self, guide_id: str) -> GuideSpec:
        """The guide network `guide_id` (`register_guides`); an unknown id is one line."""
        specs = self._unique("register_guides", "id", "guide")
        if guide_id not in specs:
            raise UserError(f"unknown guide '{guide_id}' (known: {', '.join(sorted(specs)) or 'none'})")
        return specs[guide_id]

    def _unique(self, hook_name: str, key: str, what: str) -> dict:
        """A registration hook's records by their `key` field; a name two plugins claim is one line."""
        specs = {}
        for spec in self._collect(hook_name):
            name = getattr(spec, key)
            if name in specs:
                raise UserError(f"{what} '{name}' is provided by two plugins: '{specs[name].plugin}' and "
                                f"'{spec.plugin}'")
            specs[name] = spec
        return specs


_FAILED = object()  # a plugin's hook raised: it was reported and unregistered


def _wanted() -> set[str] | None:
    """The plugin names MIMIC_LOAD_PLUGINS selects; None when it is unset (load every plugin)."""
    wanted = os.environ.get("MIMIC_LOAD_PLUGINS")
    return None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}


def _describe(exc: BaseException) -> str:
    return f"SystemExit({exc.code})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"


def _plugin_failed(message: str, exc: BaseException | None = None) -> None:
    """One warning line on stderr, or an error with MIMIC_STRICT_PLUGINS=1."""
    if os.environ.get("MIMIC_STRICT_PLUGINS", "") not in ("", "0"):
        raise UserError(message) from exc
    print(f"warning: {message}; skipped (set MIMIC_STRICT_PLUGINS=1 to make this an error)", file=sys.stderr)


def _no_models() -> UserError:
    wanted = os.environ.get("MIMIC_LOAD_PLUGINS")
    why = (f"MIMIC_LOAD_PLUGINS={wanted!r} selects no plugin that provides one" if wanted is not None else
           "no loaded plugin provides one (MIMIC_LOAD_PLUGINS is unset; see the warnings above)")
    return UserError(f"no model is registered: {why} (`mimic plugins` lists the loaded plugins)")


def _register(manager: pluggy.PluginManager, load, name: str, origin: str) -> None:
    """Import and register one plugin and check its hooks; a failure is one warning and the plugin
    is left out. The plugins registered before this one are already valid, so a pending
    validation error is this plugin's."""
    try:
        manager.register(load(), name)
        manager.check_pending()  # a misspelled hook implementation fails here, not silently
    except (Exception, SystemExit) as exc:  # SystemExit: a plugin's sys.exit() must not end the CLI
        if manager.has_plugin(name):
            manager.unregister(name=name)
        _plugin_failed(f"plugin '{name}' ({origin}) failed to load: {_describe(exc)}", exc)


def build_registry(extra_plugins: dict[str, object] | None = None) -> Registry:
    """Load every plugin of the entry-point group (plus `extra_plugins`, name -> module/object)."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    manager.register(builtin, "core")
    wanted = _wanted()
    points = list(entry_points(group=ENTRY_POINT_GROUP))
    for ep in points:
        if (wanted is None or ep.name in wanted) and not manager.has_plugin(ep.name):
            _register(manager, ep.load, ep.name, ep.value)
    for name, plugin in (extra_plugins or {}).items():
        _register(manager, lambda: plugin, name, "given directly")
    unknown = sorted((wanted or set()) - {ep.name for ep in points} - {"core"})
    if unknown:
        _plugin_failed(f"MIMIC_LOAD_PLUGINS names no installed plugin: {', '.join(unknown)} "
                       f"(installed: {', '.join(sorted({ep.name for ep in points}))})")
    return Registry(manager)


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return build_registry()
