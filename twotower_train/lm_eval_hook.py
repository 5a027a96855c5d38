"""Makes ``lm_eval --model twotower`` work: lm-eval's own command line, our model.

lm-eval (0.4.x) finds models only in its registry and has no plugin entry point, so the
installed package carries ``twotower_train-lm_eval.pth``: at interpreter start-up it runs
``install()``, which waits (a ``sys.meta_path`` finder, nothing imported) until lm-eval
imports ``lm_eval.models`` -- where lm-eval fills its registry -- and then registers
``twotower`` as a lazy placeholder for ``twotower_train.eval.lm_eval_adapter:TwoTowerLM``.
Nothing of twotower_train, torch or lm-eval is imported before lm-eval itself asks for it;
a failure here never stops the interpreter (lm-eval then reports an unknown model).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

WATCHED = "lm_eval.models"
MODEL_NAME = "twotower"
TARGET = "twotower_train.eval.lm_eval_adapter:TwoTowerLM"


def register() -> None:
    """Put ``twotower`` in lm-eval's model registry (lazily; idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``lm_eval.models`` through the other finders, runs it, then ``register()``."""

    def __init__(self) -> None:
        self._spec = None

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED or self._spec is not None:
            return None
        sys.meta_path.remove(self)  # one shot: the real finders locate the module
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        self._spec = spec
        return importlib.machinery.ModuleSpec(
            fullname,
            self,
            origin=spec.origin,
            is_package=spec.submodule_search_locations is not None,
        )

    def create_module(self, spec):
        module = self._spec.loader.create_module(self._spec)
        return module

    def exec_module(self, module) -> None:
        # Run lm-eval's own code with its own spec (file, package path), then register.
        module.__spec__ = self._spec
        module.__loader__ = self._spec.loader
        if self._spec.submodule_search_locations is not None:
            module.__path__ = list(self._spec.submodule_search_locations)
        module.__file__ = self._spec.origin
        self._spec.loader.exec_module(module)
        try:
            register()
        except Exception as exc:  # never break lm-eval because of us
            print(f"twotower_train: could not register the lm-eval model: {exc}", file=sys.stderr)


def install() -> None:
    """Arm the hook (called from the .pth file; a no-op once lm-eval's models are loaded)."""
    if WATCHED in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
