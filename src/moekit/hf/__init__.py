"""Hugging Face MoE families: read (`view`), run through moekit (`accelerate` / `restore`), load and save.

Nothing here patches transformers at import; every change to a model is an explicit, reversible call.
"""

from moekit.hf.accelerate import accelerate, is_accelerated, restore
from moekit.hf.checkpoint import load, save
from moekit.hf.families import FAMILIES, Family, family_of
from moekit.hf.reroute import experts_per_token, reroute, scmoe_generate, scmoe_logits, unroute
from moekit.hf.routing import reference_routing
from moekit.hf.view import BlockView, HFExperts, view

__all__ = ["FAMILIES", "BlockView", "Family", "HFExperts", "accelerate", "experts_per_token", "family_of",
           "is_accelerated", "load", "reference_routing", "reroute", "restore", "save", "scmoe_generate",
           "scmoe_logits", "unroute", "view"]
