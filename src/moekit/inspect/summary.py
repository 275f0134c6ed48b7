"""`compute_stats`: every statistic of a trace (and, given the model, of its activations) as one JSON-ready dict.

The stats.json contract (scripts depend on it; new keys may be added, none renamed): `model`, `tokens`, `layers`
(one object per MoE layer with `layer`, `load`, `cv`, `entropy_mean`, `dead_experts`, `domain_share`),
`token_specialization` (per layer, 0..1), `transitions` (per consecutive layer pair, `matrix` E x E row-stochastic)
and `super_experts` (list of {layer, expert, max_abs, ablation_loss_delta}).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from moekit.data import TextDoc
from moekit.inspect import stats as st
from moekit.inspect.trace import Trace


def _token_text(tokenizer, token_id: int) -> str:
    decode = getattr(tokenizer, "decode", None)
    return decode([token_id]) if decode is not None else str(token_id)


def layer_stats(trace: Trace, i: int, tokenizer=None) -> dict:
    """Everything known about traced layer i from the trace alone."""
    bal = st.balance(trace, i)
    dead = st.dead_experts(trace, i)
    ent = st.entropy(trace, i)
    top = st.top_tokens(trace, i)
    if tokenizer is not None:
        for per_expert in top:
            for entry in per_expert:
                entry["text"] = _token_text(tokenizer, entry["token_id"])
    return {
        "layer": trace.layers[i], "num_experts": trace.num_experts[i], "k": trace.k[i],
        "load": st.load(trace, i).tolist(), "cv": bal["cv"], "max_over_mean": bal["max_over_mean"],
        "entropy_mean": ent["mean"], "entropy": ent, "mass_coverage": st.mass_coverage(trace, i),
        "dead_experts": dead["dead"], "near_dead_experts": dead["near_dead"],
        "domain_share": st.domain_share(trace, i),
        "domain_specialization": st.domain_specialization(trace, i),
        "domain_specialization_baseline": st.domain_specialization_baseline(trace, i),
        "tcess": {d: st.tcess(trace, i, d).tolist() for d in trace.domain_names},
        "token_specialization": st.token_specialization(trace, i),
        "token_specialization_baseline": st.token_specialization_baseline(trace, i),
        "top_tokens": top,
        "coactivation": st.coactivation(trace, i).tolist(),
        "position": st.position_effects(trace, i),
    }


def compute_stats(trace: Trace, model: nn.Module | None = None, docs: Sequence[TextDoc] | None = None,
                  tokenizer=None, *, super_factor: float = 5.0, activation_tokens: int | None = 4096,
                  ablation_tokens: int | None = 2048, progress: bool = True) -> dict:
    """The stats.json dict of `trace`. With `model` (and the docs / tokenizer the trace was made from; None:
    moekit-tiny's defaults) it also measures activations: super experts with ablation, the largest outlier of the
    model whether or not it is super (`top_outlier`), and expert health."""
    layers = [layer_stats(trace, i, tokenizer) for i in range(len(trace.layers))]
    out: dict = {
        "model": trace.model, "tokens": trace.num_tokens, "domains": trace.domain_names, "seq_len": trace.seq_len,
        "layers": layers,
        "token_specialization": [ly["token_specialization"] for ly in layers],
        "token_specialization_baseline": [ly["token_specialization_baseline"] for ly in layers],
        "transitions": [{"from": trace.layers[i], "to": trace.layers[i + 1],
                         "matrix": st.transitions(trace, i).tolist()} for i in range(len(trace.layers) - 1)],
        "super_experts": [],
        "super_experts_checked": model is not None,
    }
    if model is None:
        return out
    acts = st.expert_activations(model, docs, tokenizer, max_tokens=activation_tokens, progress=progress)
    ranking = st.outlier_ranking(acts)
    flagged = [c for c in ranking if c[3] >= super_factor]
    described = st.describe_outliers(model, flagged or ranking[:1], acts, docs, tokenizer,
                                     max_tokens=ablation_tokens)
    out["super_experts"] = described if flagged else []
    out["super_expert_factor"] = super_factor
    out["top_outlier"] = described[0]
    out["expert_max_abs"] = acts.max_abs
    out["expert_health"] = st.expert_health(model, activations=acts)
    return out


def summary_lines(stats: dict) -> list[str]:
    """A few lines of text for a terminal: per layer balance, entropy, dead experts and specialisation."""
    lines = []
    for ly in stats["layers"]:
        lines.append(f"layer {ly['layer']}: load CV {ly['cv']:.3f} (max/mean {ly['max_over_mean']:.2f}), entropy "
                     f"{ly['entropy_mean']:.3f} of {ly['entropy']['max']:.3f}, dead {ly['dead_experts'] or '-'}, "
                     f"token-id specialisation {ly['token_specialization']:.3f} (shuffled "
                     f"{ly['token_specialization_baseline']:.3f}), domain {ly['domain_specialization']:.3f} (labels "
                     f"shuffled over documents {ly['domain_specialization_baseline']:.3f})")
    if stats.get("super_experts_checked"):
        supers = ", ".join(f"layer {s['layer']} expert {s['expert']} ({s['ratio']:.1f}x median, loss "
                           f"{s['ablation_loss_delta']:+.3f} when removed)" for s in stats["super_experts"])
        lines.append(f"super experts: {supers or 'none'}")
    return lines
