"""sftbench: fine-tune Pangu-alpha under DeepSpeed and measure what each configuration costs.

``import sftbench`` makes saved model folders loadable with the transformers Auto classes, with no
``trust_remote_code``: it registers ``PanguConfig``, ``PanguForCausalLM`` and ``PanguHFTokenizer`` with
``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` for the model types ``gpt_pangu`` and ``pangu``.

The registration needs transformers and torch, which the monitor and the log readers (``sftbench.monitor``,
``sftbench.runlog``) must not import. So it happens when transformers is there to register with: at once when
transformers is already imported, otherwise right after the program's own first ``import transformers``
(a one-shot import hook; a program that never imports transformers never pays for torch). ``register()`` does it
explicitly. Importing ``sftbench.pangu`` registers the config and the model, ``sftbench.hf_tokenizer`` all three.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["register"]

_done = False


def register() -> None:
    """Register the Pangu config, model and tokenizer with the transformers Auto classes (idempotent): importing
    ``sftbench.pangu`` registers the config and the model, ``sftbench.hf_tokenizer`` the tokenizer."""
    global _done
    if not _done:
        import sftbench.hf_tokenizer  # noqa: F401  (imports sftbench.pangu)
        _done = True


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``transformers`` so that ``register()`` runs once it is loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if any(name.startswith("sftbench.") and getattr(getattr(m, "__spec__", None), "_initializing", False)
               for name, m in list(sys.modules.items())):
            # A module of ours imports transformers itself, half-initialised now: registering would import it
            # again. It registers its own classes when it is done (sftbench.pangu: config and model).
            return
        register()


if "transformers" in sys.modules:
    register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
