"""Training: the loop (`train`), its options (`TrainConfig`), run directories and checkpoints, the
learning-rate schedule and metrics logging."""

from .checkpoint import RUN_FORMAT_VERSION, init_run_dir, latest_checkpoint, list_checkpoints, save_checkpoint
from .config import TrainConfig
from .loading import load_checkpoint, load_model_weights, load_run
from .metrics import MetricsLogger, format_duration, parse_duration, plot_metrics, read_metrics
from .schedule import WarmupCosine, lr_multiplier
from .trainer import TrainingError, TrainResult, evaluate, run_training, train

__all__ = [
    "RUN_FORMAT_VERSION",
    "MetricsLogger",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "evaluate",
    "run_training",
    "train",
    "WarmupCosine",
    "format_duration",
    "init_run_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "load_run",
    "lr_multiplier",
    "parse_duration",
    "plot_metrics",
    "read_metrics",
    "save_checkpoint",
]
