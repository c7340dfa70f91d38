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


class ModuleInput:
    """A site that is a module's input rather than its output (the language model's input
    embeddings are its first decoder layer's `hidden_states`). It registers like a module: a hook
    sees that input as the output of a module and may return a replacement, so recording, steering
    and splicing work on it unchanged."""

    def __init__(self, module: torch.nn.Module, argument: str = "hidden_states"):
        self.module, self.argument = module, argument

    def register_forward_hook(self, hook, prepend: bool = False):
        def pre_hook(module, args, kwargs):
            value = args[0] if args else kwargs[self.argument]
            replaced = hook(self, (), value)
            if replaced is None:
                return None
            return ((replaced, *args[1:]), kwargs) if args else (args, {**kwargs, self.argument: replaced})

        return self.module.register_forward_pre_hook(pre_hook, prepend=prepend, with_kwargs=True)
