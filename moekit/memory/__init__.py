"""The memory wall: fewer experts (pruning by measured saliency, dynamic skipping) and fewer experts
in fast memory (offloading with a hot-expert cache and lookahead prefetch). See docs/memory.md.

- `calibrate` / `prune_model` / `prune_cli`: whole-expert pruning (frequency, REAP, random).
- `set_skipping`: NAEE / PESF skipping at inference, run by the registered `skip` expert backend.
- `load_offloaded` / `offload_model`: expert weights read on demand from the safetensors file into
  a per-layer LRU/LFU cache under a byte budget, with lookahead prefetch.
"""

from moekit.memory.calib import ExpertStats, calibrate
from moekit.memory.offload import OffloadedExperts, load_offloaded, offload_model, offload_telemetry, parse_budget
from moekit.memory.prune import choose_experts, prune_model
from moekit.memory.skip import SkipPolicy, clear_skipping, set_skipping, skip_stats

__all__ = [
    "ExpertStats", "OffloadedExperts", "SkipPolicy", "calibrate", "choose_experts", "clear_skipping",
    "load_offloaded", "offload_model", "offload_telemetry", "parse_budget", "prune_model", "set_skipping",
    "skip_stats",
]
