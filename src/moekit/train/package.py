"""Package a trained run as the embedded default model `moekit-tiny` and its dense twin `moekit-tiny-dense`: the
native checkpoints in bf16, their tokenizer, the held-out test split, training and balance curves, and a summary
with held-out perplexity per domain (MoE, dense twin, previous default) and held-out expert balance per layer.

    python -m moekit.train.package RUN_DIR DENSE_RUN_DIR OUT_DIR DENSE_OUT_DIR [PREVIOUS_DEFAULT_DIR]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from moekit.train.corpus import build_corpus
from moekit.train.tokenizer import EOS_TOKEN, load_tokenizer

EVAL_TOKENS_PER_DOMAIN = 30_000


def _token_ids(tok, texts: list[str], at_least: int) -> list[int]:
    """The texts' token ids, each text followed by EOS, until at least `at_least` ids (or the texts run out)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text).ids + [tok.token_to_id(EOS_TOKEN)])
        if len(ids) >= at_least:
            break
    return ids


@torch.no_grad()
def perplexity(model, tok, texts: list[str], seq_len: int, max_tokens: int = EVAL_TOKENS_PER_DOMAIN) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the concatenated texts (each ends with EOS)."""
    ids = _token_ids(tok, texts, max_tokens + 1)[:max_tokens + 1]
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
            ids = _token_ids(tok, texts, max_tokens)
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
            (dst / "model.safetensors").chmod(0o644)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(run / "tokenizer" / name, dst / name)
    with (out / "test_split.jsonl").open("w") as f:
        for doc in corpus.split("test"):
            f.write(json.dumps({"domain": doc.domain, "source": doc.source, "text": doc.text}) + "\n")
    _curve_png({"moekit-tiny (MoE)": run, "dense twin, same active FLOPs": dense_run}, out / "training_curve.png")
    _balance_png(run, out / "balance_curve.png")
    records = {"moe": _records(run), "dense": _records(dense_run)}
    summary = {"recipe": recipe["name"], "steps": state["step"],
               "tokens": state["step"] * recipe["batch_size"] * recipe["seq_len"] * recipe["grad_accum"],
               "prose_source": corpus.prose_source, "held_out_perplexity": results, "held_out_balance": balance,
               "params": params, "dense_params": dense_params,
               "final_train_lm_loss": {n: sum(r["lm_loss"] for r in recs[-50:]) / len(recs[-50:])
                                       for n, recs in records.items()},
               "median_tokens_per_s": {n: sorted(r["tokens_per_s"] for r in recs)[len(recs) // 2]
                                       for n, recs in records.items()},
               "same_tokenizer_as_previous": bool(previous_dir) and (Path(previous_dir) / "tokenizer.json").read_text()
               == (run / "tokenizer" / "tokenizer.json").read_text()}
    from moekit.core.tune import cpu_info

    info = cpu_info()
    summary["cpu"] = f"{info['cpu']} ({', '.join(info['cpu_flags']) or 'no bf16/AMX flags'}), {os.cpu_count()} CPUs"
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    config = json.loads((out / "config.json").read_text())
    (out / "MODEL_CARD.md").write_text(model_card(summary, config, recipe))
    return summary


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def model_card(summary: dict, config: dict, recipe: dict) -> str:
    """MODEL_CARD.md from the packaged summary: recipe, data, perplexity per domain against the dense twin and the
    previous default, held-out balance per layer, the issue's targets met or missed, and the plots."""
    ppl = summary["held_out_perplexity"]
    domains = sorted(ppl["moe"])
    bal = summary["held_out_balance"]
    E, k, width = config["n_routed_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]
    shared = config["n_shared_experts"]
    tps = summary["median_tokens_per_s"]
    lines = [
        "# moekit-tiny (v2) and its dense twin", "",
        "The default model every moekit verb uses when no model is given, and the dense model it is compared with. "
        "Both were trained from scratch on this project's 2-core CPU machine, on real text no one here wrote, and "
        "both are native transformers checkpoints: `AutoModelForCausalLM.from_pretrained(moekit.default_model_path())`"
        " and `moekit.default_dense_model_path()` load them as they are.", "",
        "| | |", "|---|---|",
        f"| architecture | DeepSeek-V3 (`deepseek_v3`): {config['num_hidden_layers']} decoder layers, hidden "
        f"{config['hidden_size']}, multi-head latent attention ({config['num_attention_heads']} heads, KV rank "
        f"{config['kv_lora_rank']}, rope dim {config['qk_rope_head_dim']}); every MLP an MoE of {E} routed SwiGLU "
        f"experts of width {width}, {k} routed per token (sigmoid scores, the balancing bias, weights renormalised "
        f"and scaled by {config['routed_scaling_factor']}) plus {shared} shared expert of width {shared * width}; "
        "tied embeddings |",
        f"| parameters | {summary['params']:,} (MoE); {summary['dense_params']:,} (dense twin) |",
        "| dense twin | `moekit-tiny-dense`: the same network with every layer dense "
        f"(`first_k_dense_replace={config['num_hidden_layers']}`), an MLP of width {(k + shared) * width} = the "
        f"{k} routed experts plus the shared one: equal active FLOPs per token, the router aside |",
        "| tokenizer | byte-level BPE, 4096 tokens (`<|endoftext|>` = 0, `<|pad|>` = 1), trained on the training split"
        + (" (identical to v1's)" if summary.get("same_tokenizer_as_previous") else "") + " |",
        "| data | prose: the reST sources of the Python 3.11 documentation (Debian `python3.11-doc`); code: the `.py` "
        "files of Python 3.11's standard library (tests excluded); documents split 90/5/5 by a sha1 hash of their "
        "path |",
        "| held-out split | `test_split.jsonl` beside this card |", "",
        "## Recipe", "",
        f"`moekit train --recipe tiny --out RUN` and `moekit train --recipe tiny-dense --out DENSE_RUN` (both in "
        f"`src/moekit/train/trainer.py`): {recipe['steps']:,} steps of {recipe['batch_size']} sequences of "
        f"{recipe['seq_len']} tokens ({summary['tokens'] / 1e6:.1f}M tokens), AdamW (lr {recipe['lr']:g}, "
        f"{recipe['warmup']} warmup steps, cosine to {recipe['lr'] * recipe['min_lr_ratio']:g}, weight decay "
        f"{recipe['weight_decay']:g}), clipping at {recipe['clip']:g}, bf16 autocast with fp32 master weights, seed "
        f"{recipe['seed']}. Balance: DeepSeek-V3's auxiliary-loss-free bias (step {recipe['bias_update_rate']:g} "
        f"per optimiser step by the sign of each expert's load against the mean) and its sequence-wise balance loss "
        f"x {recipe['seq_balance_coef']:g}; no Switch loss, no z-loss. The two runs went side by side, one thread "
        f"each; median throughput {tps['moe']:,.0f} tokens/s (MoE) and {tps['dense']:,.0f} (dense) on "
        f"{summary.get('cpu', 'this machine')} (a median over all steps, some of them shared with other work). "
        "Packaged with `python -m moekit.train.package RUN DENSE_RUN OUT DENSE_OUT [PREVIOUS]`.", "",
        "## Perplexity on the held-out split", "",
        f"The first {EVAL_TOKENS_PER_DOMAIN:,} tokens of each domain's test documents, float32, windows of "
        f"{recipe['seq_len']}:", "",
        "| domain | moekit-tiny v2 (MoE) | dense twin | v2 / dense | moekit-tiny v1 | v2 / v1 |",
        "|---|---|---|---|---|---|",
    ]
    for d in domains:
        prev = ppl.get("previous", {}).get(d)
        lines.append(f"| {d} | {_fmt(ppl['moe'][d])} | {_fmt(ppl['dense'][d])} | {ppl['moe'][d] / ppl['dense'][d]:.3f}"
                     f" | {_fmt(prev) if prev else '-'} | {ppl['moe'][d] / prev:.3f} |" if prev else
                     f"| {d} | {_fmt(ppl['moe'][d])} | {_fmt(ppl['dense'][d])} | "
                     f"{ppl['moe'][d] / ppl['dense'][d]:.3f} | - | - |")
    lines += ["", "## Expert balance on the held-out split", "",
              "Counted from the model's own selections (bias included) over the same held-out tokens of both domains:",
              "", "| layer | load CV | least-loaded expert / uniform share | most loaded / uniform | dead experts |",
              "|---|---|---|---|---|"]
    for i, (cv, lo, hi, dead) in enumerate(zip(bal["load_cv"], bal["load_min"], bal["load_max"], bal["dead"],
                                               strict=True)):
        lines.append(f"| {i} | {cv:.3f} | {lo:.3f} | {hi:.2f} | {dead} |")
    targets = [
        ("every routed expert used: least load >= 0.25 of the uniform share in every layer",
         min(bal["load_min"]) >= 0.25, f"least {min(bal['load_min']):.3f}"),
        ("load CV <= 0.3 in every layer", max(bal["load_cv"]) <= 0.3, f"largest {max(bal['load_cv']):.3f}"),
    ]
    if "previous" in ppl:
        worst = max(ppl["moe"][d] / ppl["previous"][d] for d in domains)
        targets.append(("perplexity per domain at least 15% below v1's", worst <= 0.85,
                        f"v2 / v1 at most {worst:.3f}"))
    worst_dense = max(ppl["moe"][d] / ppl["dense"][d] for d in domains)
    targets.append(("better than the dense twin in every domain", worst_dense < 1.0,
                    f"MoE / dense at most {worst_dense:.3f}"))
    lines += ["", "## The targets (issue 13)", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {t} | {'yes' if ok else 'no'} | {m} |" for t, ok, m in targets]
    lines += ["", "## Curves", "", "Training loss of both models (the MoE and its dense twin saw the same batches):",
              "", "![training curve](training_curve.png)", "",
              "Balance over training, per layer, on each training batch:", "", "![balance](balance_curve.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(package(*sys.argv[1:6]), indent=1))
