"""The merges of `moekit bench compose`: the exact sum and PEFT's add_weighted_adapter methods over the domain
LoRAs, Orthogonal Adaptation (LoRAs trained with orthogonal fixed A, then summed), composed sparse fine-tunings,
and ComPEFT-compressed LoRAs; each against each domain's own adapter alone (`max_excess_over_own`).

ComPEFT compresses each LoRA's update (A - A_init, B; moekit.compose.compeft) with both scale rules: the
least-squares scale (`compeft:<density>`) and the paper's α·std with α chosen per domain from the grid on that
domain's validation windows (`compeft:std:<density>`, the best α whatever the closed form scores). Adapters with no
init record (passed with --adapters, trained before it) are compressed from zero, noted in the record."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moekit.bench.compose_eval import EvalDocs, adapter_params, ppl_by_domain, score_docs, tokens_per_s
from moekit.compose.adapters import read_adapter, write_adapter


def _rec(setting: str, scores, own: dict[str, float], active: int, **more) -> dict:
    ppl = ppl_by_domain(scores)
    return {"setting": setting, "ppl": ppl, "ppl_mean": sum(ppl.values()) / len(ppl), "routing_accuracy": None,
            "active_params": int(active), "tokens_per_s": tokens_per_s(scores),
            "max_excess_over_own": max(ppl[d] / own[d] - 1 for d in ppl), "own_ppl": own, **more}


def _own_domain(evald: EvalDocs, d: str) -> EvalDocs:
    return EvalDocs({d: evald.texts[d]}, {d: evald.windows[d]})


def merges(model: nn.Module, pool: dict, single: dict, evald: EvalDocs, train: dict,
           domains, cfg: dict, targets: list[str], seed: int, progress: bool, base_active: int, tmp: Path,
           valid: dict | None = None) -> list[dict]:
    from moekit.bench.compose import _with_adapter
    from moekit.compose.compeft import compress_adapter, decompressed_tensors, tune_alpha, validation_loss
    from moekit.compose.merge import peft_merged, sum_adapters, train_orthogonal_lora
    from moekit.compose.sparse_ft import apply_sparse, default_params, sparse_fine_tune

    own = {d: ppl_by_domain(single[d])[d] for d in domains}
    recs = []
    adapters_list = [pool[d] for d in domains]
    for method in ("sum", "linear", "ties", "dare_linear", "svd"):
        if method == "sum":
            config, tensors = sum_adapters(adapters_list)
        else:
            config, tensors = peft_merged(model, adapters_list, method, [1.0] * len(domains), 0.5, None)
        out = write_adapter(tmp / "merge" / method, config, tensors)
        scores = _with_adapter(model, out, lambda m, method=method: score_docs(m, evald, f"merge {method}", progress))
        recs.append(_rec(f"merge:{method}", scores, own, base_active + adapter_params(tensors), rank=config["r"],
                         weights="1 each"))
    # Orthogonal Adaptation: every domain's LoRA retrained with its slot of one orthogonal basis, only B trained
    n = len(domains)
    min_in = min(m.in_features for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    rank = max(1, min(cfg["rank"], min_in // n))
    ortho = {}
    for slot, d in enumerate(domains):
        ortho[d] = tmp / "ortho" / d
        train_orthogonal_lora(model, train[d], ortho[d], slot, n, targets, rank=rank, alpha=2 * rank,
                              steps=cfg["steps"], batch_size=cfg["batch_size"], seed=seed, progress=progress)
    alone = {d: ppl_by_domain(_with_adapter(model, ortho[d], lambda m, d=d: score_docs(
        m, _own_domain(evald, d), f"orthogonal {d}", progress)))[d] for d in domains}
    config, tensors = sum_adapters([read_adapter(ortho[d]) for d in domains])
    out = write_adapter(tmp / "merge" / "orthogonal", config, tensors)
    scores = _with_adapter(model, out, lambda m: score_docs(m, evald, "orthogonal sum", progress))
    recs.append(_rec("merge:orthogonal", scores, alone, base_active + adapter_params(tensors), rank_each=rank,
                     note="own_ppl: each orthogonal LoRA alone on its domain"))
    # ComPEFT: each domain's LoRA compressed, scored on its own domain against the uncompressed LoRA
    for density in (0.1, 0.05):
        for scale in ("lsq", "std"):
            if scale == "std" and valid is None:
                continue
            per_domain, ratios, golomb, alphas, updates = {}, [], [], {}, set()
            for d in domains:
                from_zero = pool[d].init is None
                if scale == "lsq":
                    c = compress_adapter(pool[d], density, from_zero=from_zero)
                else:
                    evaluate = validation_loss(model, pool[d].config, valid[d], cfg["batch_size"])
                    c, info = tune_alpha(pool[d], density, evaluate, from_zero=from_zero, keep_closed_form=False)
                    alphas[d] = info["alpha"]
                report = c.report()
                ratios.append(report["compression_ratio"])
                golomb.append(report["compression_ratio_golomb"])
                updates.add(report["update"])
                out = write_adapter(tmp / "compeft" / f"{d}-{scale}-{density}", c.config, decompressed_tensors(c))
                per_domain[d] = _with_adapter(model, out, lambda m, d=d, scale=scale: score_docs(
                    m, _own_domain(evald, d), f"compeft {scale} {d}", progress))[d]
            setting = f"compeft:{density}" if scale == "lsq" else f"compeft:std:{density}"
            more = {"alpha": alphas, "alpha_chosen_on": "validation windows"} if scale == "std" else {}
            recs.append(_rec(setting, per_domain, own, base_active + adapter_params(pool[domains[0]].tensors),
                             density=density, scale=scale, update=" / ".join(sorted(updates)),
                             compression_ratio=min(ratios), compression_ratio_golomb=min(golomb), **more))
    # Composable sparse fine-tuning: one sparse difference per domain, composed by addition
    params = default_params(model, targets)
    diffs = {}
    for d in domains:
        batches = [train[d][i:i + cfg["batch_size"]] for i in range(0, train[d].shape[0], cfg["batch_size"])]
        diffs[d] = sparse_fine_tune(model, batches, params, cfg["sft_density"], cfg["sft_steps"], lr=1e-4,
                                     progress=progress)
    sft_alone = {}
    for d in domains:
        apply_sparse(model, [diffs[d]])
        try:
            sft_alone[d] = ppl_by_domain(score_docs(model, _own_domain(evald, d), f"sft {d}", progress))[d]
        finally:
            apply_sparse(model, [diffs[d]], sign=-1.0)
    apply_sparse(model, list(diffs.values()))
    try:
        scores = score_docs(model, evald, "sft composed", progress)
    finally:
        apply_sparse(model, list(diffs.values()), sign=-1.0)
    recs.append(_rec("merge:sft-composed", scores, sft_alone, base_active, density=cfg["sft_density"],
                     changed_entries=sum(int(i.numel()) for diff in diffs.values() for i, _ in diff.values()),
                     note="own_ppl: each sparse fine-tuning alone on its domain; differences fold into the weights"))
    return recs
