"""Finds plugins through the `mimic_toolkit` entry-point group and collects what they register.

One plugin that fails to import is reported in one warning line and skipped, so the CLI keeps
working (`MIMIC_STRICT_PLUGINS=1` makes it an error); `MIMIC_LOAD_PLUGINS=a,b` loads only those.
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
from .specs import AdapterSpec, ObjectiveSpec

ENTRY_POINT_GROUP = "mimic_toolkit"


class Registry:
    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager

    # -- plugins -----------------------------------------------------------------------------
    def plugins(self) -> list[tuple[str, list[str]]]:
        """(plugin name, hooks it implements) for every loaded plugin."""
        rows = []
        for plugin in self.manager.get_plugins():
            name = self.manager.get_name(plugin)
            hooks = sorted(caller.name for caller in self.manager.get_hookcallers(plugin) or [])
            rows.append((name, hooks))
        return sorted(rows)

    def _collect(self, hook_name: str) -> list:
        """Call one registration hook per plugin, tagging each record with its plugin's name."""
        records = []
        for plugin in self.manager.get_plugins():
            impl = getattr(plugin, hook_name, None)
            if impl is None:
                continue
            found = []
            impl(register=found.append)
            records += [replace(r, plugin=self.manager.get_name(plugin)) for r in found]
        return records

    # -- adapters -----------------------------------------------------------------------------
    def adapter_specs(self) -> dict[str, AdapterSpec]:
        specs: dict[str, AdapterSpec] = {}
        names: dict[str, AdapterSpec] = {}  # id or alias -> spec, to catch clashes
        for spec in self._collect("register_adapters"):
            for name in (spec.id, *spec.aliases):
                if name in names:
                    other = names[name]
                    raise UserError(
                        f"model name '{name}' is provided by two plugins: "
                        f"'{other.plugin}' ({other.id}) and '{spec.plugin}' ({spec.id})")
                names[name] = spec
            specs[spec.id] = spec
        return specs

    def adapter_spec(self, name: str) -> AdapterSpec:
        specs = self.adapter_specs()
        for spec in specs.values():
            if name == spec.id or name in spec.aliases:
                return spec
        known = [n for s in specs.values() for n in (s.id, *s.aliases)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known models: {', '.join(sorted(specs))}"
        raise UserError(f"unknown model '{name}'{hint} (`mimic models` lists them)")

    # -- objectives ---------------------------------------------------------------------------
    def objective_specs(self) -> dict[str, ObjectiveSpec]:
        specs: dict[str, ObjectiveSpec] = {}
        for spec in self._collect("register_objectives"):
            if spec.name in specs:
                raise UserError(f"objective term '{spec.name}' is provided by two plugins: "
                                f"'{specs[spec.name].plugin}' and '{spec.plugin}'")
            specs[spec.name] = spec
        return specs


def _selected(name: str) -> bool:
    wanted = os.environ.get("MIMIC_LOAD_PLUGINS")
    return wanted is None or name in {n.strip() for n in wanted.split(",") if n.strip()}


def build_registry(extra_plugins: dict[str, object] | None = None) -> Registry:
    """Load every plugin of the entry-point group (plus `extra_plugins`, name -> module/object)."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    manager.register(builtin, "core")
    strict = os.environ.get("MIMIC_STRICT_PLUGINS", "") not in ("", "0")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not _selected(ep.name) or manager.has_plugin(ep.name):
            continue
        try:
            manager.register(ep.load(), ep.name)
        except Exception as exc:  # a broken plugin must not take the CLI down with it
            message = f"plugin '{ep.name}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            if strict:
                raise UserError(message) from exc
            print(f"warning: {message}; skipped (set MIMIC_STRICT_PLUGINS=1 to make this an error)",
                  file=sys.stderr)
    for name, plugin in (extra_plugins or {}).items():
        manager.register(plugin, name)
    manager.check_pending()  # a misspelled hook implementation fails here, not silently
    return Registry(manager)


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return build_registry()
