"""Super experts to protect from pruning and merging, found the way `moekit inspect` finds them
(`moekit.inspect.stats.super_experts`, "Unveiling Super Experts"): an expert whose largest |down_proj output| on
the data is at least `factor` times the model-wide median of that maximum is a candidate, and it is protected when
removing it raises the loss more than removing an ordinary expert of its layer (the one whose maximum is the
layer's median). A candidate whose removal costs no more than an ordinary expert's is reported, not protected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from moekit.data import TextDoc
from moekit.inspect.stats.activations import lm_loss, super_experts


def find_super_experts(model: nn.Module, docs: Sequence[TextDoc], tokenizer, *, factor: float = 5.0,
                       max_tokens: int | None = 4096, ablation_tokens: int | None = 2048, progress: bool = True,
                       loss_fn: Callable[[nn.Module, Tensor], Tensor] = lm_loss
                       ) -> tuple[dict[int, list[int]], list[dict]]:
    """({layer: experts to protect}, inspect's records of every candidate, each with `protected` added)."""
    found = super_experts(model, docs, tokenizer, factor=factor, max_tokens=max_tokens,
                          ablation_tokens=ablation_tokens, progress=progress, loss_fn=loss_fn)
    protect: dict[int, list[int]] = {}
    for record in found:
        record["protected"] = record["ablation_loss_delta"] > record["ordinary_loss_delta"]
        if record["protected"]:
            protect.setdefault(record["layer"], []).append(record["expert"])
    return {layer: sorted(experts) for layer, experts in protect.items()}, found
