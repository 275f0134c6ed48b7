"""Benchmarks run by `moekit bench ...`: interleaved runs, medians, baselines measured in the same process."""
