"""The model-level routers of `moekit bench compose`: each picks one expert per held-out document (CoE on TF-IDF
and on hidden states, Glider's global router alone, K-shot selection per domain, P-Adapters' prompt experts chosen
by the CoE classifier), mixes prompt experts per document (the input-conditioned P-Adapter), or routes per token
inside the model with a per-document global prior (Glider).

Like every document-level router here, the input-conditioned P-Adapter routes on the document it then scores (the
mean input embedding of all its evaluation windows gives one weight vector [E] for the whole document), as CoE's
classifier reads the document's text: one pooled vector, not the tokens to predict one by one."""

from __future__ import annotations

import time

import torch
from torch import nn

from moekit.bench.compose_eval import EvalDocs, accuracy, ppl_by_domain, routed, score_docs, tokens_per_s


def _rec(setting: str, scores, acc, active, extra_seconds: float = 0.0, **more) -> dict:
    ppl = ppl_by_domain(scores)
    return {"setting": setting, "ppl": ppl, "ppl_mean": sum(ppl.values()) / len(ppl), "routing_accuracy": acc,
            "active_params": int(active), "tokens_per_s": tokens_per_s(scores, extra_seconds), **more}


class _DocumentPAdapter(nn.Module):
    """PAdapterLM with one weight vector per document, set by `route_document` before it is scored."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm, self.weights = lm, None

    @torch.no_grad()
    def route_document(self, windows: torch.Tensor) -> torch.Tensor:
        self.weights = self.lm.route(windows.reshape(1, -1))  # [1, E]
        return self.weights[0]

    def forward(self, input_ids: torch.Tensor):
        return self.lm(input_ids, weights=self.weights.expand(input_ids.shape[0], -1))


def _input_conditioned_p_adapter(model, prompts, evald: EvalDocs, train, domains, cfg, seed, progress,
                                 base_active) -> dict:
    from moekit.compose.p_adapters import PAdapter, PAdapterLM, train_p_adapter

    adapter = PAdapter({d: prompts[d] for d in domains}, representation="embedding", seed=seed)
    started = time.perf_counter()
    train_p_adapter(model, adapter, torch.cat([train[d] for d in domains]), cfg["prompt_steps"],
                    batch_size=cfg["batch_size"], seed=seed, progress=progress)
    fit_s = time.perf_counter() - started
    lm = _DocumentPAdapter(PAdapterLM(model, adapter))
    picks: dict[str, list[str]] = {d: [] for d in domains}
    mass: dict[str, list[float]] = {d: [] for d in domains}

    def before(d: str, i: int) -> None:
        w = lm.route_document(evald.windows[d][i])
        picks[d].append(domains[int(w.argmax())])
        mass[d].append(float(w[domains.index(d)]))

    scores = score_docs(lm, evald, "p-adapter (input-conditioned)", progress, before_doc=before)
    extra = sum(p.numel() for p in adapter.parameters()) - adapter.prompts.numel()
    return _rec("route:p-adapter-input", scores, accuracy(picks, {d: d for d in domains}),
                base_active + prompts[domains[0]].numel() + extra, prompt_tokens=cfg["prompt_tokens"],
                representation="embedding", own_weight={d: sum(v) / max(1, len(v)) for d, v in mass.items()},
                router_fit_seconds=round(fit_s, 2),
                note="one mixture of the prompt experts per document, from its mean input embedding")


def model_level_routers(model, tokenizer, adapters, single, split, evald: EvalDocs, train, domains, cfg,
                        seed, progress, base_active, lora_size) -> list[dict]:
    from moekit.compose.adapters import read_weights
    from moekit.compose.glider import Glider
    from moekit.compose.model_routing import (
        CompositionOfExperts,
        GliderGlobal,
        PromptedLM,
        adapter_similarity,
        kshot_select,
        train_prompt,
    )

    ident = {d: d for d in domains}
    texts_by = {d: [x.text[:4000] for x in split["train"][d][:cfg["train_docs"]]] for d in domains}
    texts = [t for d in domains for t in texts_by[d]]
    labels = [d for d in domains for _ in texts_by[d]]
    recs = []
    coe = {}
    for feats in ("tfidf", "hidden"):
        started = time.perf_counter()
        coe[feats] = CompositionOfExperts.fit(texts, labels, features=feats, model=model, tokenizer=tokenizer)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        choice = {d: coe[feats].route(evald.texts[d], model, tokenizer) for d in domains}
        route_s = time.perf_counter() - started
        recs.append(_rec(f"route:coe-{feats}", routed(single, choice), accuracy(choice, ident),
                         base_active + lora_size, route_s, router_params=int(coe[feats].coef.size),
                         router_fit_seconds=round(fit_s, 2)))
    glob = GliderGlobal.fit(texts_by, model, tokenizer, "hidden")
    started = time.perf_counter()
    gscores = {d: glob.scores(evald.texts[d], model, tokenizer) for d in domains}
    global_s = time.perf_counter() - started
    choice = {d: [domains[int(i)] for i in gscores[d].argmax(1)] for d in domains}
    recs.append(_rec("route:glider-global", routed(single, choice), accuracy(choice, ident), base_active + lora_size,
                     global_s))
    glider = Glider(model, [read_weights(adapters[d]) for d in domains], alpha=1.0, k=1)
    try:
        def before(d: str, i: int) -> None:
            glider.set_global(gscores[d][i])

        for local in ("arrow", "gates"):
            if local == "gates":
                started = time.perf_counter()
                glider.train_gates({i: train[d] for i, d in enumerate(domains)}, cfg["router_steps"],
                                   batch_size=cfg["batch_size"], seed=seed, progress=progress)
                gate_seconds = time.perf_counter() - started
            picks: dict[str, list[str]] = {d: [] for d in domains}

            def after(d: str, _i: int, picks=picks) -> None:
                w = torch.stack([layer.last_weights.mean(0) for layer in glider.layers.values()]).mean(0)
                picks[d].append(domains[int(w.argmax())])

            scores = score_docs(model, evald, f"glider {local}", progress, before_doc=before, after_doc=after)
            more = {"gate_train_seconds": round(gate_seconds, 2)} if local == "gates" else {}
            recs.append(_rec("route:glider" if local == "gates" else "route:glider-arrow", scores,
                             accuracy(picks, ident), base_active + lora_size, global_s,
                             note=f"per token and layer: local ({local}) + global cosine, top-1", **more))
    finally:
        glider.detach()
    kdocs = EvalDocs.build(tokenizer, {d: [x.text for x in (split["validation"][d] or split["train"][d][-4:])
                                           [:cfg["kshot"]]] for d in domains}, cfg["seq_len"], cfg["eval_windows"])
    from moekit.bench.compose import _with_adapter

    kscores = {e: _with_adapter(model, adapters[e], lambda m: score_docs(m, kdocs, "k-shot", progress))
               for e in domains}
    sim = adapter_similarity([read_weights(adapters[d]) for d in domains])
    choice, sets = {}, {}
    for d in domains:
        perf = [-sum(r[0] for r in kscores[e][d]) / max(1, sum(r[1] for r in kscores[e][d])) for e in domains]
        sets[d] = [domains[i] for i in kshot_select(perf, sim, m=min(2, len(domains)), diversity=0.5)]
        choice[d] = [sets[d][0]] * len(evald.windows[d])
    recs.append(_rec("route:kshot", routed(single, choice), accuracy(choice, ident), base_active + lora_size,
                     selected_pairs=sets, k=cfg["kshot"]))
    prompts = {d: train_prompt(model, train[d], cfg["prompt_tokens"], cfg["prompt_steps"], 1e-2, cfg["batch_size"],
                               seed, progress, desc=f"prompt {d}") for d in domains}
    choice = {d: coe["tfidf"].route(evald.texts[d]) for d in domains}
    per_prompt = {e: score_docs(PromptedLM(model, prompts[e]), evald, f"p-adapter {e}", progress,
                                only={d: [c == e for c in choice[d]] for d in domains}) for e in domains}
    recs.append(_rec("route:p-adapters", routed(per_prompt, choice), accuracy(choice, ident),
                     base_active + prompts[domains[0]].numel(), prompt_tokens=cfg["prompt_tokens"],
                     chooser="coe-tfidf"))
    recs.append(_input_conditioned_p_adapter(model, prompts, evald, train, list(domains), cfg, seed, progress,
                                             base_active))
    return recs
