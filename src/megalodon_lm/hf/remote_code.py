"""The `auto_map` and the two small loader files that make a saved folder load with transformers alone.

`from_pretrained(folder, trust_remote_code=True)` imports `configuration_megalodon.py` and
`modeling_megalodon.py` from the folder. They hold no model code: they import it from the installed
megalodon-lm package, so a folder never carries a stale copy of the model, and when the package is missing
the error says which pip command installs it.
"""

from __future__ import annotations

from pathlib import Path

PIP_INSTALL = "pip install 'megalodon-lm[hf]'"

# file name -> (module of the real class, class name)
_LOADERS = {
    "configuration_megalodon": ("megalodon_lm.hf.configuration", "MegalodonHFConfig"),
    "modeling_megalodon": ("megalodon_lm.hf.modeling", "MegalodonForCausalLM"),
}
AUTO_MAP = {
    "AutoConfig": "configuration_megalodon.MegalodonHFConfig",
    "AutoModelForCausalLM": "modeling_megalodon.MegalodonForCausalLM",
}

_TEMPLATE = '''"""Loader for a megalodon-lm model (transformers `trust_remote_code=True`).

The model code is the megalodon-lm package ({pip}); this file only imports it.
"""

try:  # inside try: transformers' own import check skips it, so the message below is the one users see
    from {module} import {name}
except ImportError as err:
    raise ImportError(
        "this model needs the megalodon-lm package: {pip} (" + str(err) + ")"
    ) from err

__all__ = ["{name}"]
'''


def loader_source(file_stem: str) -> str:
    """The text of one loader file ("configuration_megalodon" or "modeling_megalodon")."""
    module, name = _LOADERS[file_stem]
    return _TEMPLATE.format(module=module, name=name, pip=PIP_INSTALL)


def write_loader_files(directory: str | Path) -> None:
    """Write the loader files next to a config.json (whose `auto_map` is `AUTO_MAP`)."""
    d = Path(directory)
    for stem in _LOADERS:
        (d / f"{stem}.py").write_text(loader_source(stem), encoding="utf-8")
