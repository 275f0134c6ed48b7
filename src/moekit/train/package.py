"""Package a trained run as the embedded default model `moekit-tiny` and its dense twin `moekit-tiny-dense`: the
native checkpoints in bf16, their tokenizer, the held-out test split, training and balance curves, and a summary
with held-out perplexity per domain (MoE, dense twin, previous default) and held-out expert balance per layer.

    python -m moekit.train.package RUN_DIR DENSE_RUN_DIR OUT_DIR DENSE_OUT_DIR [PREVIOUS_DEFAULT_DIR]
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from moekit.train.corpus import build_corpus
from moekit.train.tokenizer import EOS_TOKEN, load_tokenizer

EVAL_TOKENS_PER_DOMAIN = 30_000


@torch.no_grad()
def perplexity(model, tok, texts: list[str], seq_len: int, max_tokens: int = EVAL_TOKENS_PER_DOMAIN) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the concatenated texts (each ends with EOS)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text).ids + [tok.token_to_id(EOS_TOKEN)])
        if len(ids) >= max_tokens + 1:
            break
    ids = ids[:max_tokens + 1]
    total, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, seq_len), desc="perplexity", unit="window", leave=False):
        window = torch.tensor(ids[start:start + seq_len + 1]).unsqueeze(0)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
        total, count = total + float(nll), count + window.shape[1] - 1
    return math.exp(total / count)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curve_png(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, run in runs.items():
        recs = _records(run)
        ax.plot([r["step"] for r in recs], [r["lm_loss"] for r in recs], label=label, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training LM loss (nats/token)")
    ax.set_ylim(top=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _balance_png(run: Path, out: Path) -> None:
    """Per layer, the load CV and the least-loaded expert (over the uniform share) of each training batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in _records(run) if r.get("load_cv")]
    steps = [r["step"] for r in recs]
    fig, (ax_cv, ax_min) = plt.subplots(1, 2, figsize=(9, 3.3), dpi=100)
    for layer in range(len(recs[0]["load_cv"])):
        ax_cv.plot(steps, [r["load_cv"][layer] for r in recs], label=f"layer {layer}", linewidth=0.7)
        ax_min.plot(steps, [r["load_min"][layer] for r in recs], label=f"layer {layer}", linewidth=0.7)
    ax_cv.axhline(0.3, color="k", linestyle=":", linewidth=0.8)
    ax_min.axhline(0.25, color="k", linestyle=":", linewidth=0.8)
    ax_cv.set(xlabel="step", ylabel="load CV of the batch", title="load CV (target <= 0.3)")
    ax_min.set(xlabel="step", ylabel="least-loaded expert / uniform share", title="minimum load (target >= 0.25)")
    for ax in (ax_cv, ax_min):
        ax.grid(alpha=0.3)
    ax_cv.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


@torch.no_grad()
def held_out_balance(model, tok, texts_by_domain: dict[str, list[str]], seq_len: int,
                     max_tokens: int = EVAL_TOKENS_PER_DOMAIN) -> dict[str, list[float]]:
    """Per MoE layer: load CV, least and most loaded expert over the uniform share, and dead experts, counted from
    the model's own selections on the held-out documents of every domain together."""
    from moekit.train.balance import LoadRecorder, load_stats

    recorder = LoadRecorder(model)
    try:
        for texts in texts_by_domain.values():
            ids: list[int] = []
            for text in texts:
                ids.extend(tok.encode(text).ids + [tok.token_to_id(EOS_TOKEN)])
                if len(ids) >= max_tokens:
                    break
            for start in range(0, min(len(ids), max_tokens), seq_len):
                model(input_ids=torch.tensor(ids[start:start + seq_len]).unsqueeze(0))
        return load_stats(recorder.counts)
    finally:
        recorder.close()


def package(run_dir: str, dense_dir: str, out_dir: str, dense_out_dir: str, previous_dir: str | None = None) -> dict:
    """Evaluate the MoE run, its dense twin and (if given) the previous default on the held-out split, and write
    the MoE to out_dir and the dense twin to dense_out_dir in bf16 with the tokenizer; plots and summary.json
    beside the MoE."""
    from transformers import AutoModelForCausalLM

    import moekit.hf as mh

    run, dense_run, out, dense_out = Path(run_dir), Path(dense_dir), Path(out_dir), Path(dense_out_dir)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    recipe = state["recipe"]
    corpus = build_corpus(recipe.get("prose_dir"), recipe.get("code_dir"), recipe["max_docs_per_domain"],
                          recipe["seed"] if recipe.get("data_seed") is None else recipe["data_seed"])
    texts = {domain: [d.text for d in corpus.split("test") if d.domain == domain] for domain in corpus.domains()}
    tok = load_tokenizer(run / "tokenizer")
    models = {"moe": run / "model", "dense": dense_run / "model"}
    toks = {"moe": tok, "dense": load_tokenizer(dense_run / "tokenizer")}
    if previous_dir:
        from tokenizers import Tokenizer

        models["previous"] = Path(previous_dir)
        toks["previous"] = Tokenizer.from_file(str(Path(previous_dir) / "tokenizer.json"))
    results: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[name] = {domain: perplexity(model, toks[name], t, recipe["seq_len"]) for domain, t in texts.items()}
        if name == "moe":
            balance = held_out_balance(model, tok, texts, recipe["seq_len"])
    for src, dst in ((run / "model", out), (dense_run / "model", dense_out)):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
        if dst == out:
            params = sum(p.numel() for p in model.parameters())
            mh.save(model, dst, force=True)
        else:
            dense_params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(dst)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(run / "tokenizer" / name, dst / name)
    with (out / "test_split.jsonl").open("w") as f:
        for doc in corpus.split("test"):
            f.write(json.dumps({"domain": doc.domain, "source": doc.source, "text": doc.text}) + "\n")
    _curve_png({"moekit-tiny (MoE)": run, "dense twin, same active FLOPs": dense_run}, out / "training_curve.png")
    _balance_png(run, out / "balance_curve.png")
    last = _records(run)[-50:]
    summary = {"recipe": recipe["name"], "steps": state["step"],
               "tokens": state["step"] * recipe["batch_size"] * recipe["seq_len"] * recipe["grad_accum"],
               "prose_source": corpus.prose_source, "held_out_perplexity": results, "held_out_balance": balance,
               "params": params, "dense_params": dense_params,
               "final_train_lm_loss": {"moe": sum(r["lm_loss"] for r in last) / len(last),
                                       "dense": sum(r["lm_loss"] for r in _records(dense_run)[-50:]) / 50},
               "median_tokens_per_s": {n: sorted(r["tokens_per_s"] for r in _records(d))[len(_records(d)) // 2]
                                       for n, d in (("moe", run), ("dense", dense_run))},
               "same_tokenizer_as_previous": bool(previous_dir) and (Path(previous_dir) / "tokenizer.json").read_text()
               == (run / "tokenizer" / "tokenizer.json").read_text()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    print(json.dumps(package(*sys.argv[1:6]), indent=1))
