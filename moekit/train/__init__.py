"""Training: the trainer (`moekit train`), bits-per-byte evaluation (`moekit eval`), routing
telemetry, plots, the MoE-vs-dense main job over seeds (`moekit compare`: moekit.train.compare.compare),
the token-budget sweep (`moekit sweep`: moekit.train.sweep.sweep) and their statistics (moekit.train.stats)."""

from moekit.train.telemetry import CollapseWarning, Telemetry, load_stats
from moekit.train.trainer import TrainConfig, TrainError, TrainResult, latest_checkpoint, train

__all__ = ["CollapseWarning", "Telemetry", "TrainConfig", "TrainError", "TrainResult", "latest_checkpoint",
           "load_stats", "train"]
