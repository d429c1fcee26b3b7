"""megalodon-lm: Megalodon long-context language models in plain PyTorch (exact, streaming, CPU-friendly).

The public API (everything in `__all__`):

Models
    MegalodonConfig         the model's fields and defaults; `MegalodonConfig.from_preset("mini")`, PRESETS
    MegalodonLM             the language model: `model(input_ids, targets=None, state=None, return_state=False,
                            attention_mask=None)` -> MegalodonOutput (logits, loss, state)
    StreamState             the carried state of a stream (CEMA, TimestepNorm statistics, partial chunk)

Training (what `megalodon-lm train` runs)
    train(config=None, **options) -> TrainResult     options are the CLI's, underscored
    TrainConfig                                      every option with its default
    load_run(run_dir, device="cpu", step=None)       -> (model in eval mode, tokenizer)

Generation
    generate(model, prompts, max_new_tokens=..., temperature=..., top_k=..., seed=...) -> new token ids
    stream_generate(...)                             the same, one step at a time
    save_state(state, path, model) / load_state(path, model)   continue a stream later, exactly

More in the subpackages: `megalodon_lm.evals` (bits per byte vs context, passkey, MQAR, the lm-eval model),
`megalodon_lm.hf` (the transformers adapter), `megalodon_lm.distributed` (torchrun, FSDP2, chunk parallelism).
Training and generation load on first use, so `import megalodon_lm` stays light; transformers, PEFT and
lm-eval learn about this package when they are imported (`megalodon_lm.integrations`, docs/huggingface.md).
See README.md and docs/.
"""

from typing import TYPE_CHECKING

from .models import PRESETS, MegalodonConfig, MegalodonLM, MegalodonOutput, StreamState

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily (__getattr__)
    from .generation import generate, load_state, save_state, stream_generate
    from .training import TrainConfig, load_run, train

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "MegalodonConfig",
    "MegalodonLM",
    "MegalodonOutput",
    "StreamState",
    "TrainConfig",
    "__version__",
    "generate",
    "load_run",
    "load_state",
    "save_state",
    "stream_generate",
    "train",
]

_LAZY = {"train": "training", "load_run": "training", "TrainConfig": "training", "generate": "generation",
         "stream_generate": "generation", "save_state": "generation", "load_state": "generation"}


def __getattr__(name: str):
    """Training and generation entry points load on first use (they pull in the data and tokenizer stack)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # dir() lists the lazy names too, so help(megalodon_lm) and tab completion show the whole API.
    return sorted(set(globals()) | set(__all__))


# transformers, PEFT and lm-eval learn about this package when (and if) they are imported: nothing loads now.
from . import integrations as _integrations  # noqa: E402

_integrations.install()
