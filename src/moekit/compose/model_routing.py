"""Routing among whole expert models or adapters, once per input (a document or prompt), not per token.

- Composition of Experts (CoE, Jain et al.): a category classifier on the input, then a category-to-expert map.
  The classifier is scikit-learn's logistic regression on TF-IDF character n-grams or on mean-pooled hidden states
  of the base model. Saved as JSON (coefficients, vocabulary, idf): no pickle.
- Glider (Li et al.): a global semantic router (cosine between the input's embedding and each expert's task
  embedding, here the centroid of its training documents' embeddings, where the paper embeds an LLM-written task
  description); its per-layer local router is in moekit.compose.glider.
- K-shot selection (Open-knowledge MoE, Yang et al.): from a pool, pick experts by K-shot performance and
  diversity: greedily, the best performer first, then the one maximising performance - λ · max similarity to those
  already picked (performance min-max normalised; similarity: cosine of the flattened LoRA updates).
- P-Adapters' MoE variant (Newman et al.): one learned continuous prompt per expert (prompt tuning, base frozen),
  chosen per input by a classifier (the CoE classifier). The input-conditioned variant (a network mixing the
  prompt experts by the input's representation) is moekit.compose.p_adapters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError, UnknownNameError
from moekit.files import MAX_JSON_BYTES, atomic_write, read_bounded

FEATURES = ("tfidf", "hidden")
ROUTERS = ("coe-tfidf", "coe-hidden", "glider-global", "p-adapter")  # what `moekit route fit` builds


class RouterError(ConfigError):
    """A model-level router file or its inputs cannot be used."""


def check_router(name: str, flag: str = "--router") -> None:
    if name not in ROUTERS:
        raise UnknownNameError(f"{flag} {name}: unknown router; expected one of {', '.join(ROUTERS)}")


# --- features ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def hidden_features(model: nn.Module, tokenizer, texts: list[str], max_tokens: int = 256,
                    layer: int = -1) -> np.ndarray:
    """Mean-pooled hidden states [N, H] of `layer` (default the last) of the base model, one row per text."""
    from moekit.data import encode

    rows = []
    for text in texts:
        ids = encode(tokenizer, text)[:max_tokens] or [0]
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        rows.append(out.hidden_states[layer][0].float().mean(0).numpy())
    return np.stack(rows)


@dataclass
class TfidfFeatures:
    """TF-IDF of character 2-4-grams (within word boundaries), sublinear tf, L2-normalised rows."""

    vocabulary: dict[str, int] = field(default_factory=dict)
    idf: list[float] = field(default_factory=list)

    def _vectorizer(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, max_features=20000,
                               dtype=np.float32)

    def fit(self, texts: list[str]) -> TfidfFeatures:
        vec = self._vectorizer().fit(texts)
        self.vocabulary = {k: int(v) for k, v in vec.vocabulary_.items()}
        self.idf = vec.idf_.tolist()
        return self

    def transform(self, texts: list[str]):
        vec = self._vectorizer()
        vec.vocabulary_ = self.vocabulary
        vec.idf_ = np.asarray(self.idf)
        return vec.transform(texts)


# --- Composition of Experts --------------------------------------------------------------------------------------

@dataclass
class CompositionOfExperts:
    """Category classifier (logistic regression) + category-to-expert map."""

    features: str
    categories: list[str]
    expert_map: dict[str, str]
    coef: np.ndarray
    intercept: np.ndarray
    tfidf: TfidfFeatures | None = None
    hidden_layer: int = -1

    @classmethod
    def fit(cls, texts: list[str], categories: list[str], expert_map: dict[str, str] | None = None,
            features: str = "tfidf", model: nn.Module | None = None, tokenizer=None, c: float = 10.0,
            ) -> CompositionOfExperts:
        from sklearn.linear_model import LogisticRegression

        if features not in FEATURES:
            raise UnknownNameError(f"features {features!r}: unknown; expected one of {', '.join(FEATURES)}")
        names = sorted(set(categories))
        if len(texts) != len(categories) or len(names) < 2:
            raise RouterError(f"{len(texts)} texts with {len(categories)} labels in {len(names)} categories; expected "
                              f"one label per text and at least two categories")
        expert_map = expert_map or {n: n for n in names}
        missing = [n for n in names if n not in expert_map]
        if missing:
            raise RouterError(f"category {missing[0]!r}: no expert in the category-to-expert map; expected one per "
                              f"category ({', '.join(names)})")
        tfidf = TfidfFeatures().fit(texts) if features == "tfidf" else None
        x = tfidf.transform(texts) if tfidf else _standardise(hidden_features(model, tokenizer, texts))
        clf = LogisticRegression(C=c, max_iter=2000).fit(x, [names.index(y) for y in categories])
        coef, intercept = clf.coef_, clf.intercept_
        if len(names) == 2:  # scikit-learn keeps one row for two classes
            coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
        return cls(features, names, dict(expert_map), coef, intercept, tfidf)

    def scores(self, texts: list[str], model: nn.Module | None = None, tokenizer=None) -> np.ndarray:
        """Logits [N, categories]."""
        if self.tfidf is not None:
            x = self.tfidf.transform(texts)
            return np.asarray(x @ self.coef.T) + self.intercept
        if model is None or tokenizer is None:
            raise RouterError("a hidden-state router needs the base model and its tokenizer (--model)")
        return _standardise(hidden_features(model, tokenizer, texts, layer=self.hidden_layer)) @ self.coef.T \
            + self.intercept

    def categorise(self, texts: list[str], model=None, tokenizer=None) -> list[str]:
        return [self.categories[i] for i in self.scores(texts, model, tokenizer).argmax(1)]

    def route(self, texts: list[str], model=None, tokenizer=None) -> list[str]:
        """The expert for each text."""
        return [self.expert_map[c] for c in self.categorise(texts, model, tokenizer)]

    def to_json(self) -> dict:
        out = {"router": f"coe-{self.features}", "features": self.features, "categories": self.categories,
               "expert_map": self.expert_map, "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
               "hidden_layer": self.hidden_layer}
        if self.tfidf is not None:
            out["tfidf"] = {"vocabulary": self.tfidf.vocabulary, "idf": self.tfidf.idf}
        return out

    @classmethod
    def from_json(cls, d: dict) -> CompositionOfExperts:
        tfidf = TfidfFeatures(d["tfidf"]["vocabulary"], d["tfidf"]["idf"]) if d.get("tfidf") else None
        return cls(d["features"], d["categories"], d["expert_map"], np.asarray(d["coef"]),
                   np.asarray(d["intercept"]), tfidf, d.get("hidden_layer", -1))


def _standardise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (hidden states differ in scale between layers and models)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --- Glider ------------------------------------------------------------------------------------------------------

@dataclass
class GliderGlobal:
    """Glider's global router: cosine of the input's embedding with each expert's task embedding."""

    experts: list[str]
    task_embeddings: np.ndarray  # [E, H], unit rows
    features: str = "hidden"
    tfidf: TfidfFeatures | None = None
    # Glider's trained local gates (a safetensors file beside the router file) and the adapters they were trained on
    gates: str | None = None
    adapters: dict[str, str] | None = None

    @classmethod
    def fit(cls, texts_by_expert: dict[str, list[str]], model=None, tokenizer=None, features: str = "hidden"
            ) -> GliderGlobal:
        if len(texts_by_expert) < 1 or any(not t for t in texts_by_expert.values()):
            raise RouterError("Glider: expected at least one expert with some texts describing its task")
        experts = list(texts_by_expert)
        tfidf = TfidfFeatures().fit([t for ts in texts_by_expert.values() for t in ts]) if features == "tfidf" \
            else None
        rows = [_embed(texts_by_expert[e], model, tokenizer, tfidf).mean(0) for e in experts]
        return cls(experts, _standardise(np.stack(rows)), features, tfidf)

    def scores(self, texts: list[str], model=None, tokenizer=None) -> np.ndarray:
        """Cosine similarities [N, E]."""
        return _standardise(_embed(texts, model, tokenizer, self.tfidf)) @ self.task_embeddings.T

    def route(self, texts: list[str], model=None, tokenizer=None) -> list[str]:
        return [self.experts[i] for i in self.scores(texts, model, tokenizer).argmax(1)]

    def to_json(self) -> dict:
        out = {"router": "glider-global", "experts": self.experts, "features": self.features,
               "task_embeddings": self.task_embeddings.tolist()}
        if self.tfidf is not None:
            out["tfidf"] = {"vocabulary": self.tfidf.vocabulary, "idf": self.tfidf.idf}
        if self.gates is not None:
            out.update(gates=self.gates, adapters=self.adapters)
        return out

    @classmethod
    def from_json(cls, d: dict) -> GliderGlobal:
        tfidf = TfidfFeatures(d["tfidf"]["vocabulary"], d["tfidf"]["idf"]) if d.get("tfidf") else None
        return cls(d["experts"], np.asarray(d["task_embeddings"]), d.get("features", "hidden"), tfidf,
                   d.get("gates"), d.get("adapters"))


def _embed(texts: list[str], model, tokenizer, tfidf: TfidfFeatures | None) -> np.ndarray:
    if tfidf is not None:
        return tfidf.transform(texts).toarray()
    if model is None or tokenizer is None:
        raise RouterError("a hidden-state router needs the base model and its tokenizer (--model)")
    return _standardise(hidden_features(model, tokenizer, texts))


# --- K-shot selection --------------------------------------------------------------------------------------------

def kshot_select(performance, similarity, m: int, diversity: float = 0.5) -> list[int]:
    """Indices of `m` experts: the best K-shot performer first, then greedily argmax perf_e - diversity ·
    max_{s picked} sim(e, s) (perf min-max normalised to [0, 1]). performance [E] (higher is better), similarity
    [E, E]."""
    perf = torch.as_tensor(np.asarray(performance), dtype=torch.float64).reshape(-1)
    sim = torch.as_tensor(np.asarray(similarity), dtype=torch.float64)
    n = perf.numel()
    if n == 0:
        raise RouterError("K-shot selection: empty expert pool; expected at least one expert")
    if sim.shape != (n, n) or not 1 <= m <= n:
        raise RouterError(f"K-shot selection: {n} experts, similarity {tuple(sim.shape)}, m={m}; expected an "
                          f"[E, E] similarity and 1 <= m <= E")
    span = float(perf.max() - perf.min())
    norm = (perf - perf.min()) / span if span > 0 else torch.ones_like(perf)
    picked = [int(norm.argmax())]
    while len(picked) < m:
        redundancy = sim[:, picked].max(dim=1).values
        score = norm - diversity * redundancy
        score[picked] = -float("inf")
        picked.append(int(score.argmax()))
    return picked


def adapter_similarity(adapters: list) -> Tensor:
    """Cosine similarity [E, E] of the adapters' flattened updates (moekit.compose.adapters.LoraWeights)."""
    rows = []
    for w in adapters:
        rows.append(torch.cat([(w.scaling * b @ a).reshape(-1) for _, (a, b) in sorted(w.modules.items())]))
    x = F.normalize(torch.stack(rows), dim=1)
    return x @ x.T


@torch.no_grad()
def kshot_nll(model: nn.Module, tokenizer, adapter_dirs: list, texts: list[str], max_tokens: int = 512) -> list[float]:
    """Mean next-token NLL of each adapter (PEFT, loaded in turn) on the K-shot texts (each cut at max_tokens)."""
    from peft import PeftModel

    from moekit.data import encode

    ids = [torch.tensor([encode(tokenizer, t)[:max_tokens]]) for t in texts]
    ids = [x for x in ids if x.shape[1] >= 2]
    if not ids:
        raise RouterError("K-shot texts: none of two or more tokens; expected some K-shot examples")
    out = []
    for path in adapter_dirs:
        peft_model = PeftModel.from_pretrained(model, str(path)).eval()
        try:
            total = sum(float(F.cross_entropy(peft_model(input_ids=x).logits[0, :-1].float(), x[0, 1:],
                                              reduction="sum")) for x in ids)
        finally:
            peft_model.unload()
        out.append(total / sum(x.shape[1] - 1 for x in ids))
    return out


# --- P-Adapters' MoE: continuous prompt experts ------------------------------------------------------------------

class PromptedLM(nn.Module):
    """A frozen causal LM with a learned continuous prompt [P, H] before every input (prompt tuning); forward
    returns logits for the input positions only."""

    def __init__(self, model: nn.Module, prompt: Tensor) -> None:
        super().__init__()
        self.model = model
        self.prompt = nn.Parameter(prompt.clone())

    def forward(self, input_ids: Tensor) -> SimpleNamespace:
        embeds = self.model.get_input_embeddings()(input_ids)
        prefix = self.prompt.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        logits = self.model(inputs_embeds=torch.cat([prefix, embeds], dim=1)).logits
        return SimpleNamespace(logits=logits[:, self.prompt.shape[0]:])


def train_prompt(model: nn.Module, windows: Tensor, n_tokens: int = 8, steps: int = 100, lr: float = 1e-2,
                 batch_size: int = 8, seed: int = 0, progress: bool = True, desc: str = "prompt") -> Tensor:
    """One continuous prompt [n_tokens, H] trained on windows [N, L] with the model frozen; initialised from the
    embeddings of random vocabulary tokens (as in prompt tuning)."""
    from moekit.compose.loop import fit

    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    init = emb[torch.randint(0, emb.shape[0], (n_tokens,), generator=g)].detach().float()
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = PromptedLM(model, init)
    try:
        fit(wrapped, windows, [wrapped.prompt], steps, lr, batch_size, seed, progress=progress, desc=desc)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    return wrapped.prompt.detach().clone()


def save_prompts(prompts: dict[str, Tensor], out: str | os.PathLike) -> Path:
    from safetensors.torch import save as save_bytes

    path = Path(out)
    atomic_write(path, save_bytes({k: v.contiguous() for k, v in prompts.items()}))
    return path


# --- reading a router file ---------------------------------------------------------------------------------------

def save_router(router: CompositionOfExperts | GliderGlobal, out: str | os.PathLike, inputs: list = ()) -> Path:
    from moekit.files import check_output

    path = check_output(out, inputs, flag="--out", directory=False, error=RouterError)
    atomic_write(path, json.dumps(router.to_json()) + "\n")
    return path


def load_router(path: str | os.PathLike) -> CompositionOfExperts | GliderGlobal:
    raw = read_bounded(path, MAX_JSON_BYTES, "router file", RouterError)
    try:
        d = json.loads(raw)
        kind = d["router"]
        if kind.startswith("coe-"):
            return CompositionOfExperts.from_json(d)
        if kind == "glider-global":
            return GliderGlobal.from_json(d)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise RouterError(f"{path}: not a router file ({type(e).__name__}: {e}); expected the JSON written by "
                          f"moekit route fit") from None
    raise RouterError(f"{path}: router {kind!r}; expected one of {', '.join(ROUTERS)}")
