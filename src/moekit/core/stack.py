"""`link_layers`: tell the MoE layers of one model their order, for routers that carry state from layer to layer."""

from __future__ import annotations

from torch import nn


def link_layers(moes: list[nn.Module]) -> None:
    """Call once after building a model's stack of `MoE` layers (bottom to top). Routers with a `link(previous)`
    hook (the recurrent router, RMoE) get the router of the layer below (None for the first layer, which starts
    every forward from a fresh state); the others are left alone."""
    previous = None
    for moe in moes:
        link = getattr(moe.router, "link", None)
        if link is not None:
            link(previous)
        previous = moe.router
