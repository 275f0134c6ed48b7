"""MoEfication of a BERT-style encoder (all-MiniLM-L6-v2 and other `BertModel`s): each chosen layer's FFN,
y = W_out gelu(W_in x + b_in) + b_out, is split into experts by a neuron partition (expert e keeps rows S_e of W_in
and b_in, columns S_e of W_out; b_out is added once), and a router picks k experts per token whose outputs are added
at weight 1, as in MoEfication. The layer's dropout, residual and LayerNorm are untouched.

The swap is in place and reversible (`restore_encoder`): `layer.intermediate` becomes a `MoEFFN` that returns the
FFN's output, and `layer.output.dense` an identity, so `BertOutput` adds the residual and normalises as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.core.dispatch import dispatch, plan_assignments
from moekit.core.experts import Experts
from moekit.errors import ConfigError
from moekit.make.partition import check_split, partition_neurons
from moekit.make.routers import DATA_ROUTERS, fit_norm_router, make_router


class MoEFFN(nn.Module):
    """A BERT FFN as E gelu experts (moekit `Experts`, sort-by-expert dispatch) and a linear top-k router. With
    `mean_act [I]` (each neuron's mean activation on calibration text) an expert that is not chosen still adds its
    mean output (G-MoEfication's centring): expert e computes W_out[:, S_e] (a_{S_e} - mu_{S_e}) and the constant
    sum_e W_out[:, S_e] mu_{S_e} joins the output bias, so with every expert chosen the FFN is still exact."""

    def __init__(self, intermediate: nn.Module, output_dense: nn.Linear, partition: Tensor, router: Tensor, k: int,
                 mean_act: Tensor | None = None, norm_router: nn.Module | None = None, tau: float = 0.9):
        super().__init__()
        w_in, b_in = intermediate.dense.weight.detach(), intermediate.dense.bias.detach()
        w_out = output_dense.weight.detach()
        experts, width = partition.shape
        self.experts = Experts(experts, w_in.shape[1], width, activation="gelu", bias=True, dtype=w_in.dtype)
        with torch.no_grad():
            self.experts.gate_up_proj.copy_(w_in[partition])
            self.experts.gate_up_proj_bias.copy_(b_in[partition])
            self.experts.down_proj.copy_(torch.stack([w_out[:, s] for s in partition]))
            self.experts.down_proj_bias.zero_()
        out_bias = output_dense.bias.detach().clone()
        if mean_act is not None:
            mean_out = torch.stack([w_out[:, s] @ mean_act[s].to(w_out) for s in partition])  # [E, H]
            with torch.no_grad():
                self.experts.down_proj_bias.copy_(-mean_out)
            out_bias += mean_out.sum(0)
        self.out_bias = nn.Parameter(out_bias)
        self.router = nn.Parameter(router.to(w_in.dtype).clone())
        self.k = k
        self.norm_router, self.tau = norm_router, tau  # D2DMoE: dynamic k from predicted output norms
        self.routed = [0, 0]  # dynamic k: tokens, expert slots, since the swap
        self.original = (intermediate, output_dense)  # for restore_encoder; not registered as submodules

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.norm_router is not None:
            return self._dynamic(flat).view_as(x)
        idx = (flat @ self.router.t()).topk(self.k, dim=-1).indices
        plan = plan_assignments(idx, torch.ones(idx.shape, dtype=flat.dtype), self.experts.num_experts)
        return (dispatch(flat, plan, self.experts) + self.out_bias).view_as(x)


    def _dynamic(self, flat: Tensor) -> Tensor:
        """Each token through the experts `dynamic_k` picks from the norm router's predictions, at weight 1."""
        from moekit.make.routers import dynamic_k

        mask = dynamic_k(self.norm_router(flat.float()), self.tau)  # [T, E]
        self.routed[0] += mask.shape[0]
        self.routed[1] += int(mask.sum())
        e = self.experts
        out = torch.zeros_like(flat)
        for i in range(e.num_experts):
            rows = mask[:, i].nonzero().flatten()
            if rows.numel():
                h = nn.functional.gelu(flat[rows] @ e.gate_up_proj[i].t() + e.gate_up_proj_bias[i])
                out.index_add_(0, rows, h @ e.down_proj[i].t() + e.down_proj_bias[i])
        return out + self.out_bias


def experts_per_token(model: nn.Module) -> float | None:
    """The mean number of experts per token of the dynamic-k (d2d) layers over every forward since they were made
    (None if there are none)."""
    counts = [ly.intermediate.routed for ly in bert_layers(model)
              if isinstance(ly.intermediate, MoEFFN) and ly.intermediate.routed[0]]
    return sum(c[1] for c in counts) / sum(c[0] for c in counts) if counts else None


def bert_layers(model: nn.Module) -> nn.ModuleList:
    encoder = getattr(getattr(model, "bert", model), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not all(hasattr(ly, "intermediate") and hasattr(ly, "output") for ly in layers):
        raise ConfigError(f"model: {type(model).__name__} has no BERT encoder layers (encoder.layer[i].intermediate /"
                          " .output); expected a BertModel")
    return layers


@torch.no_grad()
def capture_encoder_inputs(model: nn.Module, batches: Sequence[dict], layers: Sequence[int],
                           max_tokens: int = 4096) -> dict[int, Tensor]:
    """Each layer's FFN inputs [N, H] on real (unpadded) tokens of tokenizer `batches`."""
    blocks = bert_layers(model)
    seen: dict[int, list[Tensor]] = {i: [] for i in layers}
    current: dict[str, Tensor] = {}

    def keep(i):
        def hook(_m, args):
            mask = current["mask"].reshape(-1).bool()
            seen[i].append(args[0].reshape(-1, args[0].shape[-1])[mask].float())
        return hook

    handles = [blocks[i].intermediate.register_forward_pre_hook(keep(i)) for i in layers]
    try:
        total = 0
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            model(**batch)
            total += int(batch["attention_mask"].sum())
            if total >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(x)[:max_tokens] for i, x in seen.items()}


def moefy_encoder(model: nn.Module, experts: int, k: int, partition: str = "kmeans", router: str = "centroid",
                  layers: Sequence[int] | None = None, inputs: dict[int, Tensor] | None = None,
                  seed: int = 0, centred: bool = False, partitions: dict[int, Tensor] | None = None,
                  tau: float = 0.9) -> nn.Module:
    """Swap the FFNs of `layers` (default all) for `MoEFFN`s, in place; returns `model`. With calibration `inputs`
    and `centred`, experts left out add their mean output and the learned router predicts each expert's squared
    deviation from its mean (G-MoEfication). `partitions[layer]`, when given, is used instead of computing one.
    router="d2d": D2DMoE, a norm-regression router fitted on `inputs` and a dynamic number of experts per token
    (those whose predicted output norms reach `tau` of the total; `k` is then unused)."""
    blocks = bert_layers(model)
    act = getattr(model.config, "hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"model: hidden_act={act!r}; the experts compute the exact (erf) gelu, expected 'gelu'")
    layers = list(range(len(blocks))) if layers is None else list(layers)
    width = blocks[0].intermediate.dense.out_features
    check_split(width, experts)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ConfigError(f"k={k!r}: expected an integer in 1..experts={experts}")
    if router == "d2d" and (centred or not 0.0 <= tau <= 1.0):
        raise ConfigError(f"router=d2d: tau={tau}, centred={centred}; expected tau in [0, 1] and no centring")
    if (partition == "coactivation" or router in (*DATA_ROUTERS, "d2d")) and inputs is None:
        raise ConfigError(f"partition={partition}, router={router}: needs calibration inputs "
                          "(capture_encoder_inputs)")
    for i in layers:
        ly = blocks[i]
        if isinstance(ly.intermediate, MoEFFN):
            raise ConfigError(f"layer {i}: already MoEfied; expected a dense FFN (restore_encoder first)")
        rows = ly.intermediate.dense.weight.detach()
        x = None if inputs is None else inputs[i].to(rows.dtype)
        with torch.no_grad():
            acts = None if x is None else ly.intermediate(x)
        if partitions is not None and i in partitions:
            part = partitions[i]
        else:
            part = partition_neurons(partition, rows, experts, seed, acts, layer=i)
        mean_act = acts.mean(0) if centred and acts is not None else None
        norm_router = None
        if router == "d2d":
            w_out = ly.output.dense.weight.detach()
            norms = torch.stack([(acts[:, s] @ w_out[:, s].t()).norm(dim=-1) for s in part], dim=-1)
            norm_router = fit_norm_router(x, norms, seed=seed)
            r = torch.zeros(experts, rows.shape[1])
        else:
            r = make_router(router, rows, part, x, acts if mean_act is None else acts - mean_act, seed,
                            square=centred, down=ly.output.dense.weight.detach())
        ly.intermediate = MoEFFN(ly.intermediate, ly.output.dense, part, r, k, mean_act, norm_router, tau)
        ly.output.dense = nn.Identity()
    return model


def restore_encoder(model: nn.Module) -> nn.Module:
    """Undo `moefy_encoder`: every MoEfied layer gets its dense FFN modules back. In place; returns `model`."""
    for ly in bert_layers(model):
        if isinstance(ly.intermediate, MoEFFN):
            ly.intermediate, ly.output.dense = ly.intermediate.original
    return model
