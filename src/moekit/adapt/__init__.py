"""Experts that adapt: DriftMoE for drifting streams, a drift switcher for reproducible streams, test-time rerouting
of a bridged Hugging Face MoE, multi-task gates (MMoE, PLE, HoME, TaskExpert), continual experts (TAME, SEMA)."""

from __future__ import annotations

from moekit.adapt.continual import SEMA, TAME, LossJumpDetector
from moekit.adapt.driftmoe import DriftMoE
from moekit.adapt.multitask import PLE, HoME, MMoE, SharedBottom, TaskExpert, diagnostics
from moekit.adapt.reroute import Rerouting, reroute_online
from moekit.adapt.streams import Prequential, drift_probability, switch

__all__ = ["PLE", "SEMA", "TAME", "DriftMoE", "HoME", "LossJumpDetector", "MMoE", "Prequential", "Rerouting",
           "SharedBottom", "TaskExpert", "diagnostics", "drift_probability", "reroute_online", "switch"]
