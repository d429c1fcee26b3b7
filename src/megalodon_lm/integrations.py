"""Lazy registration with transformers, PEFT and lm-evaluation-harness, at no cost to `import megalodon_lm`.

After `import megalodon_lm`, the Auto classes know model_type "megalodon_lm" (`AutoConfig`,
`AutoModelForCausalLM`), PEFT's LoRA knows this model's default `target_modules` (`LORA_TARGET_MODULES`) and
lm-eval's model registry knows "megalodon". None of those libraries is imported here (they are optional and
slow to import): a finder on `sys.meta_path` waits for the one module of each library that holds its registry
and registers right after that module has run. A library imported before `megalodon_lm` is registered with
at once. A failed registration warns and never breaks the other library's import.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

# LoRA's default targets: the MEGA sub-layer's projections. wz feeds the shared query/key (z), wv the values,
# wr the output gate, wh1 and wh2 the output (PEFT's defaults for transformer LMs are the attention
# projections too). Add "fc1", "fc2" (and "fc3" with swiglu) for the feed-forward network.
LORA_TARGET_MODULES: tuple[str, ...] = ("wz", "wv", "wr", "wh1", "wh2")
MODEL_TYPE = "megalodon_lm"  # transformers model_type (not "megalodon": no clash with a future upstream model)
LM_EVAL_MODEL_NAME = "megalodon"
LM_EVAL_MODEL_TARGET = "megalodon_lm.evals.lm_eval_model:MegalodonEvalLM"


def register_auto_config() -> None:
    """`AutoConfig` -> `MegalodonHFConfig` for model_type "megalodon_lm"."""
    # From the module itself, not `transformers.AutoConfig`: this runs while transformers' lazy package may
    # still be importing the Auto classes' other modules.
    from transformers.models.auto.configuration_auto import AutoConfig

    from .hf.configuration import MegalodonHFConfig

    AutoConfig.register(MODEL_TYPE, MegalodonHFConfig, exist_ok=True)


def register_auto_model() -> None:
    """`AutoModelForCausalLM` -> `MegalodonForCausalLM` (and the config, which that needs)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from .hf.configuration import MegalodonHFConfig
    from .hf.modeling import MegalodonForCausalLM

    register_auto_config()
    AutoModelForCausalLM.register(MegalodonHFConfig, MegalodonForCausalLM, exist_ok=True)


def register_lora_targets() -> None:
    """PEFT's per-model_type default LoRA targets: `LoraConfig()` without target_modules works."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    mapping.setdefault(MODEL_TYPE, list(LORA_TARGET_MODULES))


def register_lm_eval_model() -> None:
    """lm-eval's model "megalodon", as a lazy placeholder (our module loads when lm-eval first asks for it)."""
    from lm_eval.api.registry import model_registry

    if LM_EVAL_MODEL_NAME not in model_registry:
        model_registry.register(LM_EVAL_MODEL_NAME, target=LM_EVAL_MODEL_TARGET)


# The module whose execution completes each library's registry -> what to run then.
HOOKS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": register_auto_config,
    "transformers.models.auto.modeling_auto": register_auto_model,
    "peft.utils.constants": register_lora_targets,
    # lm-eval fills its registry with its own models in lm_eval.models; ours joins right after.
    "lm_eval.models": register_lm_eval_model,
}


def _run(name: str) -> None:
    hook = HOOKS[name]
    try:
        hook()
    except Exception as err:  # a registration problem must not break the user's import of the other library
        warnings.warn(f"megalodon-lm could not register with {name.split('.')[0]} ({type(err).__name__}: {err}); "
                      f"call megalodon_lm.integrations.{hook.__name__}() yourself", stacklevel=3)


class _LoaderAfterExec(importlib.abc.Loader):
    """Wraps a module's loader: runs the module, then our hook. Everything else is the wrapped loader's."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run(self._name)

    def __getattr__(self, attr: str) -> Any:  # get_source, is_package, resource readers, ...
        return getattr(self._loader, attr)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds the hooked modules with the other finders and wraps their loaders."""

    def __init__(self) -> None:
        self._local = threading.local()  # re-entrancy guard: we call the other finders from find_spec

    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKS or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderAfterExec(spec.loader, fullname)
        return spec


_installed = False


def install() -> None:
    """Register with the libraries already imported; hook the ones imported later. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.meta_path.insert(0, _AfterImportFinder())
    for name in HOOKS:
        module = sys.modules.get(name)
        # A module still executing (we were imported from inside it) has no registry yet to add to: skipped.
        if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            _run(name)
