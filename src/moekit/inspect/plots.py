"""The report's pictures, drawn from a stats.json dict with matplotlib (Agg, no global pyplot state), as PNG bytes."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _grid(n: int, width: float = 3.4, height: float = 3.0) -> tuple[Figure, list]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1).tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def load_heatmap(stats: dict) -> bytes:
    """Layer x expert: each expert's share of its layer's routed assignments, relative to uniform (1 = 1/E)."""
    layers = stats["layers"]
    E = max(ly["num_experts"] for ly in layers)
    grid = np.full((len(layers), E), np.nan)
    for r, ly in enumerate(layers):
        grid[r, :ly["num_experts"]] = np.array(ly["load"]) * ly["num_experts"]
    fig = Figure(figsize=(max(5.0, 0.45 * E + 2), 0.5 * len(layers) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, label="load x E (1 = uniform)")
    if E <= 32:
        for r, ly in enumerate(layers):
            for e in range(ly["num_experts"]):
                ax.text(e, r, "dead" if e in ly["dead_experts"] else f"{grid[r, e]:.2f}", ha="center", va="center",
                        fontsize=7, color="w" if grid[r, e] < np.nanmax(grid) * 0.6 else "k")
    ax.set_yticks(range(len(layers)), [f"layer {ly['layer']}" for ly in layers])
    ax.set_xlabel("expert")
    ax.set_title("Expert load per layer")
    return _png(fig)


def entropy_plot(stats: dict) -> bytes:
    """Distribution over tokens of the router entropy, one line per layer, with log E (a uniform router)."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for ly in stats["layers"]:
        ent = ly["entropy"]
        edges, counts = np.array(ent["edges"]), np.array(ent["counts"], dtype=float)
        ax.step(edges[:-1], counts / max(counts.sum(), 1), where="post",
                label=f"layer {ly['layer']} (mean {ent['mean']:.2f})")
    ax.axvline(stats["layers"][0]["entropy"]["max"], color="grey", ls="--", label="log E (uniform)")
    ax.set_xlabel("router entropy per token (nats)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Router entropy")
    ax.legend(fontsize=7)
    return _png(fig)


def _matrix_grid(mats: list[np.ndarray], titles: list[str], xlabel: str, ylabel: str, suptitle: str) -> bytes:
    fig, axes = _grid(len(mats))
    for ax, m, title in zip(axes, mats, titles, strict=True):
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(suptitle)
    return _png(fig)


def coactivation_plot(stats: dict) -> bytes:
    """Per layer, P(expert b also chosen | expert a chosen) from the co-activation counts."""
    mats = []
    for ly in stats["layers"]:
        c = np.array(ly["coactivation"], dtype=float)
        m = c / np.maximum(np.diag(c)[:, None], 1)
        np.fill_diagonal(m, np.nan)  # always 1: left blank so the partners stand out
        mats.append(m)
    return _matrix_grid(mats, [f"layer {ly['layer']}" for ly in stats["layers"]], "expert b", "expert a",
                        "Co-activation: P(b chosen | a chosen)")


def transitions_plot(stats: dict) -> bytes:
    """Per consecutive layer pair, P(expert j at the next layer | expert i at this one)."""
    pairs = stats["transitions"]
    return _matrix_grid([np.array(p["matrix"]) for p in pairs], [f"layer {p['from']} -> {p['to']}" for p in pairs],
                        "expert at next layer", "expert at this layer", "Cross-layer transitions")


def domain_plot(stats: dict) -> bytes:
    """Per layer, each expert's share of each domain's assignments (bars side by side per expert)."""
    layers = stats["layers"]
    fig, axes = _grid(len(layers), width=4.2, height=2.8)
    for ax, ly in zip(axes, layers, strict=True):
        domains = list(ly["domain_share"])
        width = 0.8 / len(domains)
        for d, name in enumerate(domains):
            x = np.arange(ly["num_experts"]) + (d - (len(domains) - 1) / 2) * width
            ax.bar(x, ly["domain_share"][name], width=width, label=name)
        ax.set_title(f"layer {ly['layer']} (specialisation {ly['domain_specialization']:.3f})", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_xticks(range(ly["num_experts"]))
    axes[0].set_ylabel("share of the domain's assignments", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle("Domain specialisation", y=1.03)
    return _png(fig)


def specialization_plot(stats: dict) -> bytes:
    """Token-id specialisation per layer against the same measure with token ids shuffled."""
    layers = [ly["layer"] for ly in stats["layers"]]
    x = np.arange(len(layers))
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.bar(x - 0.2, stats["token_specialization"], 0.4, label="token id -> expert")
    ax.bar(x + 0.2, stats["token_specialization_baseline"], 0.4, label="token ids shuffled")
    if stats["domains"]:
        ax.plot(x, [ly["domain_specialization"] for ly in stats["layers"]], "ko-", label="domain (I(E;D)/H(D))")
    ax.set_xticks(x, [f"layer {n}" for n in layers])
    ax.set_ylim(0, 1)
    ax.set_ylabel("1 - H(E | token) / H(E)")
    ax.set_title("How much the token id (or domain) explains the routing")
    ax.legend(fontsize=7)
    return _png(fig)


def position_plot(stats: dict) -> bytes:
    """Drop rate under capacity factor 1 and load CV against the position in the input, per layer."""
    fig = Figure(figsize=(9, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    for ly in stats["layers"]:
        pos = ly["position"]
        mid = [(a + b) / 2 for a, b in zip(pos["edges"][:-1], pos["edges"][1:], strict=True)]
        ax1.plot(mid, pos["drop_rate"], "o-", label=f"layer {ly['layer']}")
        load = np.array(pos["load"])
        ax2.plot(mid, load.std(axis=1) / np.maximum(load.mean(axis=1), 1e-12), "o-", label=f"layer {ly['layer']}")
    ax1.set_title(f"Drop rate at capacity factor {stats['layers'][0]['position']['capacity_factor']:g}", fontsize=9)
    ax2.set_title("Load CV by position", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("position in the input")
    ax1.legend(fontsize=7)
    return _png(fig)


def super_expert_plot(stats: dict) -> bytes:
    """Largest |down_proj output| of every expert (log scale), with the super-expert threshold (the factor times
    the median over the experts some token reached, the lower middle value as `outlier_ranking` takes it)."""
    vals = stats["expert_max_abs"]
    flat = np.array([v for row in vals for v in row])
    used = np.sort(flat[flat > 0])
    threshold = stats["super_expert_factor"] * float(used[(used.size - 1) // 2]) if used.size else 0.0
    fig = Figure(figsize=(max(6.0, 0.12 * flat.size + 2), 3.4))
    ax = fig.subplots()
    ax.set_yscale("log")
    pos = 0
    for r, row in enumerate(vals):  # an expert no token reached has no bar
        ax.bar(np.arange(pos, pos + len(row)), row, label=f"layer {stats['layers'][r]['layer']}")
        pos += len(row) + 1
    positive = flat[flat > 0]
    if positive.size:
        ax.set_ylim(float(positive.min()) / 2, max(float(positive.max()), threshold) * 2)
    ax.axhline(threshold, color="red", ls="--", label=f"{stats['super_expert_factor']:g} x median")
    ax.set_xlabel("expert (grouped by layer)")
    ax.set_ylabel("max |down_proj output|")
    ax.set_title("Activation outliers per expert (super experts cross the line)")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def health_plot(stats: dict) -> bytes:
    """Layer x expert: fraction of near-zero intermediate activations (HoME's expert collapse)."""
    health = stats["expert_health"]
    rows = health["near_zero"]
    E = max(len(r) for r in rows)
    grid = np.full((len(rows), E), np.nan)
    for r, row in enumerate(rows):
        grid[r, :len(row)] = row
    fig = Figure(figsize=(max(5.0, 0.45 * E + 2), 0.5 * len(rows) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, label="near-zero fraction")
    ax.set_yticks(range(len(rows)), [f"layer {n}" for n in health["layers"]])
    ax.set_xlabel("expert")
    ax.set_title("Expert health: near-zero activations inside each expert")
    return _png(fig)


def all_plots(stats: dict) -> dict[str, bytes]:
    """file name -> PNG, for what the stats hold (domain plots need labels; activation plots need the model)."""
    plots = {"load_heatmap.png": load_heatmap(stats), "entropy.png": entropy_plot(stats),
             "coactivation.png": coactivation_plot(stats), "specialization.png": specialization_plot(stats),
             "position.png": position_plot(stats)}
    if stats["transitions"]:
        plots["transitions.png"] = transitions_plot(stats)
    if stats["domains"]:
        plots["domain_share.png"] = domain_plot(stats)
    if "expert_max_abs" in stats:
        plots["super_experts.png"] = super_expert_plot(stats)
        plots["expert_health.png"] = health_plot(stats)
    return plots
