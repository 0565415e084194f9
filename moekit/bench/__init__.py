"""Benchmarks: `moekit bench` (engines side by side, roofline measured in the same run)."""
