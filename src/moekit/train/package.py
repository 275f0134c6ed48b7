"""Package a trained run as the embedded default model `moekit-tiny`: the native checkpoint in bf16, its tokenizer,
the held-out test split, a training-curve plot and a model card with held-out perplexity per domain next to the
dense model trained by the same recipe.

    python -m moekit.train.package RUN_DIR DENSE_RUN_DIR OUT_DIR
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


def _curve_png(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, run in runs.items():
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["step"] for r in recs], [r["lm_loss"] for r in recs], label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training LM loss (nats/token)")
    ax.set_ylim(top=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def package(run_dir: str, dense_dir: str, out_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    import moekit.hf as mh

    run, dense_run, out = Path(run_dir), Path(dense_dir), Path(out_dir)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    recipe = state["recipe"]
    corpus = build_corpus(recipe.get("prose_dir"), recipe.get("code_dir"), recipe["max_docs_per_domain"],
                          recipe["seed"] if recipe.get("data_seed") is None else recipe["data_seed"])
    tok = load_tokenizer(run / "tokenizer")
    results: dict[str, dict[str, float]] = {}
    models = {"moe": run / "model", "dense": dense_run / "model"}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[name] = {domain: perplexity(model, tok, [d.text for d in corpus.split("test") if d.domain == domain],
                                            recipe["seq_len"]) for domain in corpus.domains()}
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.bfloat16).eval()
    mh.save(model, out, force=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run / "tokenizer" / name, out / name)
    with (out / "test_split.jsonl").open("w") as f:
        for doc in corpus.split("test"):
            f.write(json.dumps({"domain": doc.domain, "source": doc.source, "text": doc.text}) + "\n")
    _curve_png({"moekit-tiny (MoE)": run, "dense, same active FLOPs": dense_run}, out / "training_curve.png")
    summary = {"recipe": recipe["name"], "steps": state["step"], "prose_source": corpus.prose_source,
               "held_out_perplexity": results,
               "params": sum(p.numel() for p in model.parameters())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    print(json.dumps(package(*sys.argv[1:4]), indent=1))
