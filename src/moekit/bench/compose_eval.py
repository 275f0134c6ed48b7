"""Helpers of `moekit bench compose`: held-out documents cut into windows and scored one document at a time (so a
model-level router can pick an expert per document), parameter counts, and the issue's targets."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from moekit.data import encode

DocScores = dict[str, list[tuple[float, int, float]]]  # domain -> per document (summed NLL, tokens, seconds)


@dataclass
class EvalDocs:
    """Held-out documents per domain, each as windows [n, L] of at most `max_windows` windows."""

    texts: dict[str, list[str]]
    windows: dict[str, list[Tensor]]

    @classmethod
    def build(cls, tokenizer, texts: dict[str, list[str]], seq_len: int, max_windows: int) -> EvalDocs:
        windows: dict[str, list[Tensor]] = {}
        kept: dict[str, list[str]] = {}
        for domain, docs in texts.items():
            for text in docs:
                ids = encode(tokenizer, text)
                if len(ids) < 2:
                    continue
                n = max(1, min(max_windows, len(ids) // seq_len))
                length = min(seq_len, len(ids))
                windows.setdefault(domain, []).append(torch.tensor(ids[: n * length]).view(n, length))
                kept.setdefault(domain, []).append(text)
        return cls(kept, windows)

    def tokens(self) -> int:
        return sum(w.shape[0] * (w.shape[1] - 1) for ws in self.windows.values() for w in ws)


@torch.no_grad()
def score_docs(model: nn.Module, docs: EvalDocs, desc: str, progress: bool = True,
               before_doc: Callable[[str, int], None] | None = None,
               after_doc: Callable[[str, int], None] | None = None, only: dict[str, list[bool]] | None = None
               ) -> DocScores:
    """Per document: summed next-token NLL, tokens scored, seconds. before_doc/after_doc(domain, index) run around
    each document (a router sets its choice there); `only` skips documents marked False."""
    model.eval()
    out: DocScores = {}
    total = sum(len(ws) for ws in docs.windows.values())
    bar = tqdm(total=total, desc=desc, unit="doc", disable=not progress, leave=False)
    for domain, ws in docs.windows.items():
        rows = []
        for i, w in enumerate(ws):
            bar.update(1)
            if only is not None and not only[domain][i]:
                rows.append((0.0, 0, 0.0))
                continue
            if before_doc is not None:
                before_doc(domain, i)
            start = time.perf_counter()
            logits = model(input_ids=w).logits[:, :-1].float()
            nll = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
            rows.append((nll, w.shape[0] * (w.shape[1] - 1), time.perf_counter() - start))
            if after_doc is not None:
                after_doc(domain, i)
        out[domain] = rows
    bar.close()
    return out


def ppl_by_domain(scores: DocScores) -> dict[str, float]:
    return {d: math.exp(sum(r[0] for r in rows) / max(1, sum(r[1] for r in rows))) for d, rows in scores.items()}


def tokens_per_s(scores: DocScores, extra_seconds: float = 0.0) -> float:
    tokens = sum(r[1] for rows in scores.values() for r in rows)
    seconds = sum(r[2] for rows in scores.values() for r in rows) + extra_seconds
    return tokens / seconds if seconds > 0 else float("nan")


def routed(per_expert: dict[str, DocScores], choice: dict[str, list[str]]) -> DocScores:
    """Scores of each document under the expert the router chose for it (from the experts' cached scores)."""
    return {d: [per_expert[choice[d][i]][d][i] for i in range(len(rows))]
            for d, rows in next(iter(per_expert.values())).items()}


def accuracy(choice: dict[str, list[str]], expert_of: dict[str, str]) -> float:
    """Share of documents routed to their own domain's expert."""
    hits = sum(c == expert_of[d] for d, cs in choice.items() for c in cs)
    return hits / max(1, sum(len(cs) for cs in choice.values()))


def active_base_params(model: nn.Module) -> int:
    """Parameters a token uses: every parameter, with the routed experts' (3D tensors) counted at k / E."""
    config = model.config
    k = getattr(config, "num_experts_per_tok", None)
    experts = next((getattr(config, a) for a in ("n_routed_experts", "num_experts", "num_local_experts")
                    if getattr(config, a, None)), None)
    total = 0
    seen = set()
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * (k / experts) if p.dim() == 3 and k and experts else p.numel()
    return int(total)


def adapter_params(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def mixture_target(mixtures: dict[str, dict[str, float]], oracle: dict[str, float],
                   singles: dict[str, dict[str, float]]) -> dict:
    """A routed mixture within 2% of the in-domain LoRA on every domain and better than every single LoRA averaged
    over domains: per mixture, and whether any meets it."""
    mean = {name: sum(p.values()) / len(p) for name, p in singles.items()}
    per = {}
    for name, ppl in mixtures.items():
        worst = max(ppl[d] / oracle[d] - 1 for d in oracle)
        avg = sum(ppl.values()) / len(ppl)
        per[name] = {"max_excess_over_oracle": worst, "mean_ppl": avg, "within_2pct_every_domain": worst <= 0.02,
                     "better_than_every_single_on_average": all(avg < m for m in mean.values())}
        per[name]["met"] = per[name]["within_2pct_every_domain"] and per[name]["better_than_every_single_on_average"]
    return {"target": "a routed mixture within 2% of the in-domain LoRA on every domain, better than every single "
            "LoRA on average", "best_single_mean_ppl": min(mean.values()), "mixtures": per,
            "met": any(v["met"] for v in per.values())}
