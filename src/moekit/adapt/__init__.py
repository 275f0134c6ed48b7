"""Experts that adapt: DriftMoE for drifting streams, drift switching for reproducible streams, test-time rerouting
of a bridged Hugging Face MoE, multi-task gates, continual experts (TAME, SEMA)."""

from __future__ import annotations

from moekit.adapt.driftmoe import DriftMoE

__all__ = ["DriftMoE"]
