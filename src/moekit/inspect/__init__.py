"""Routing inspection: `trace` a model over documents, compute `stats` of the trace, write a report."""

from moekit.inspect import stats
from moekit.inspect.layers import InspectError, MoELayer, find_layers
from moekit.inspect.summary import compute_stats
from moekit.inspect.trace import Trace, trace

__all__ = ["InspectError", "MoELayer", "Trace", "compute_stats", "find_layers", "stats", "trace"]
