"""Training: the trainer (`moekit train`), bits-per-byte evaluation (`moekit eval`), routing
telemetry, plots, and the MoE-vs-dense main job (`moekit compare`)."""

from moekit.train.telemetry import CollapseWarning, Telemetry, load_stats
from moekit.train.trainer import TrainConfig, TrainError, TrainResult, latest_checkpoint, train

__all__ = ["CollapseWarning", "Telemetry", "TrainConfig", "TrainError", "TrainResult", "latest_checkpoint",
           "load_stats", "train"]
