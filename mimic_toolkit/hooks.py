"""Forward hooks on named modules for the duration of a `with` block: the one mechanism behind
feature statistics, LM recording and steering."""
from __future__ import annotations

from functools import partial

import torch


class SiteHooks:
    """Subclasses implement `on_output(site, output)`; a return value other than None replaces
    the module's output. With `prepend`, the hook runs before hooks registered earlier (such as the
    output-recording hooks transformers adds on the first forward), so they see the edited output."""

    prepend = False

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self._handles = []

    def on_output(self, site: str, output):
        raise NotImplementedError

    def __enter__(self):
        for site, module in self.modules.items():
            hook = partial(self._call, site)
            self._handles.append(module.register_forward_hook(hook, prepend=self.prepend))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _call(self, site, module, inputs, output):
        return self.on_output(site, output)
