"""`moekit tour`: a short walk through what moekit does, on the embedded default model `moekit-tiny` (and its dense
twin, made into an MoE in the last step) and on a standalone MoE layer. Prints as it goes and writes a
self-contained `tour/report.html`: one section per step, tables as HTML tables, plots, generated samples, and the
numbers to look at first at the top."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moekit.bench.layer import CASES, run_case
from moekit.cli.tour_report import Report
from moekit.core.layer import MoE

HELP = ("a quick tour: the default model, an MoE layer, the dispatch benchmark, the Hugging Face bridge, inspecting, "
        "compressing, and making an MoE from the dense twin")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per benchmark contender (default 5)")
    p.add_argument("--out", default="tour", help="where report.html goes (default: tour)")


def run(args: argparse.Namespace) -> int:
    from moekit.errors import ConfigError
    from moekit.files import check_output

    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: expected a positive number of timed rounds")
    out = check_output(args.out)
    rep = Report("moekit tour")
    _default_model_step(rep)
    _layer_step(rep)
    _bench_step(rep, args.repeats)
    _bridge_step(rep)
    _inspect_step(rep)
    _compress_step(rep)
    _make_step(rep)
    rep.write(out)
    print(f"\nReport: {Path(args.out) / 'report.html'}")
    return 0


def _default_model_step(rep: Report) -> None:
    from moekit.default import DEFAULT_MODEL_DIR, default_model, default_test_split, default_tokenizer
    from moekit.hf.info import describe
    from moekit.train.package import perplexity

    rep.section("The embedded default model, moekit-tiny (trained here by `moekit train --recipe tiny`)")
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        rep.say("(not packaged in this checkout; skipped)")
        return
    info = describe(str(DEFAULT_MODEL_DIR))
    experts = sorted(set(info["experts_per_layer"].values()))
    rep.say(f"{info['family']}: {info['num_layers']} layers, {info['total_params']:,} parameters "
            f"({info['active_params']:,} active per token), {experts} experts per layer, k={info['k']}, "
            f"{info['dtype']}, {info['total_bytes'] / 2**20:.1f} MiB")
    rep.headline("default model", f"{info['family']}, {info['total_params'] / 1e6:.1f}M parameters, "
                 f"{info['active_params'] / 1e6:.1f}M active per token, {experts[0]} experts per layer, k={info['k']}")
    model, tok = default_model(), default_tokenizer()
    docs = default_test_split()
    summary_path = DEFAULT_MODEL_DIR / "summary.json"
    card = json.loads(summary_path.read_text()).get("held_out_perplexity", {}) if summary_path.exists() else {}
    rows = []
    for domain in ("prose", "code"):
        texts = [d["text"] for d in docs if d["domain"] == domain]
        ppl = perplexity(model, tok.backend_tokenizer, texts, 256, max_tokens=4096)
        rows.append({"domain": domain, "perplexity (4k tokens, this run)": round(ppl, 1),
                     "model card (30k tokens)": round(card["moe"][domain], 1) if card else None,
                     "dense model, equal active FLOPs (card)": round(card["dense"][domain], 1) if card else None})
        rep.headline(f"held-out perplexity, {domain}", f"{ppl:.1f} on 4k tokens" + (
            f" (model card, 30k tokens: {card['moe'][domain]:.1f}; the dense model of equal active FLOPs: "
            f"{card['dense'][domain]:.1f})" if card else ""))
    rep.table(rows, caption="Held-out perplexity per domain")
    for domain in ("prose", "code"):
        text = next(d["text"] for d in docs if d["domain"] == domain)
        prompt = tok(text[:120], return_tensors="pt").input_ids[:, :24]
        with torch.no_grad():
            greedy = model.generate(prompt, max_new_tokens=40, do_sample=False)
            torch.manual_seed(0)
            sampled = model.generate(prompt, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95)
        rep.sample(f"{domain}, greedy (after a 24-token prompt from a held-out document)",
                   tok.decode(greedy[0], skip_special_tokens=True))
        rep.sample(f"{domain}, sampled (temperature 0.8, top-p 0.95, seed 0, same prompt)",
                   tok.decode(sampled[0], skip_special_tokens=True))
    curve = DEFAULT_MODEL_DIR / "training_curve.png"
    if curve.exists():
        rep.figure("training curve (moekit-tiny against a dense model of equal active FLOPs)", curve.read_bytes())


def _layer_step(rep: Report) -> None:
    torch.manual_seed(0)
    rep.section("An MoE layer: 8 SwiGLU experts, top-2 softmax routing, one shared expert")
    moe = MoE(hidden_size=256, intermediate_size=512, num_experts=8, k=2, num_shared_experts=1)
    rep.code(str(moe))
    x = torch.randn(4, 128, 256)
    out = moe(x)
    rep.say(f"routed {out.routing.num_tokens} tokens: output {tuple(out.hidden.shape)}, aux loss "
            f"{out.aux_loss.item():.4f} ({', '.join(f'{k}={v.item():.3f}' for k, v in out.losses.items())})")
    counts = out.expert_counts.tolist()
    rep.say(f"tokens per expert: {counts} (max/mean = {max(counts) / (sum(counts) / len(counts)):.2f})")
    capped = MoE(256, 512, 8, k=2, capacity_factor=0.5)
    capped.load_state_dict(moe.state_dict(), strict=False)
    rep.say(f"with capacity factor 0.5: {capped(x).dropped} of {2 * out.routing.num_tokens} assignments dropped")


def _bench_step(rep: Report, repeats: int) -> None:
    rep.section("The dispatch path against transformers' Mixtral/DeepSeek blocks and a dense FFN of equal active "
                "FLOPs")
    records = []
    for case in CASES:
        records.extend(run_case(case.scaled(4), repeats))
    cols = ["case", "tokens", "dtype", "moekit_ms", "transformers_eager_ms", "transformers_grouped_mm_ms", "dense_ms",
            "dense_over_moekit"]
    rep.table(records, cols, caption="Shapes 1/4 of `moekit bench layer`, medians of interleaved runs (ms; "
              "dense_over_moekit above 1: moekit faster than a dense FFN of equal active FLOPs)")
    prefill = [r for r in records if r["case"].startswith("prefill") and r.get("dense_over_moekit")]
    if prefill:
        rep.headline("MoE layer speed (prefill)", f"{prefill[0]['dense_over_moekit']}x a dense FFN of equal active "
                     "FLOPs (this run, 1/4-size shapes)")
    rep.say("Full benchmark: `moekit bench layer --json` (or `make bench`); results in docs/benchmarks.md.")


def _bridge_step(rep: Report) -> None:
    """The default model (or a small random Qwen3-MoE) run by transformers, then through moekit's dispatch."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import moekit.hf as mh
    from moekit.default import DEFAULT_MODEL_DIR, default_model

    rep.section("The Hugging Face bridge: transformers' own forward, then moekit.hf.accelerate")
    torch.manual_seed(0)
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        model, name = default_model(), "moekit-tiny"
    else:
        config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256)
        model, name = AutoModelForCausalLM.from_config(config).eval(), "a small random Qwen3-MoE"
    rep.table([{"layer": b.layer, "experts": b.num_experts, "k": b.k,
                "gate_up_proj": str(tuple(b.experts.gate_up_proj.shape))} for b in mh.view(model)],
              caption=f"{name}: each MoE block as moekit sees it (the model's own tensors, not copies)")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
        mh.accelerate(model)
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
        mh.restore(model)
    diff, same = float((logits - ref_logits).abs().max()), torch.equal(tokens, ref_tokens)
    rep.say(f"after accelerate: max |logit difference| {diff:.2e}, greedy tokens identical: {same}; "
            "restore puts transformers' path back")
    rep.headline("bridge parity", f"max |logit difference| {diff:.1e}, greedy tokens identical: {same}")


def _inspect_step(rep: Report) -> None:
    """Routing statistics of moekit-tiny on 2k held-out tokens (prose and code); `moekit inspect` does it all."""
    from moekit.default import DEFAULT_MODEL_DIR, default_model, default_tokenizer
    from moekit.inspect import compute_stats, trace
    from moekit.inspect.plots import domain_plot, load_heatmap

    rep.section("Inspecting the routing: moekit-tiny on 2,048 held-out tokens, half prose, half code")
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        rep.say("(not packaged in this checkout; skipped)")
        return
    from moekit.hf import accelerate

    model = accelerate(default_model())
    stats = compute_stats(trace(model, None, default_tokenizer(), max_tokens=2048, progress=False))
    rows = [{"layer": ly["layer"], "load CV": round(ly["cv"], 3), "max/mean": round(ly["max_over_mean"], 2),
             "dead experts": ", ".join(map(str, ly["dead_experts"])) or "-",
             "entropy": f"{ly['entropy_mean']:.3f} of {ly['entropy']['max']:.3f}",
             "token-id specialisation (shuffled)": f"{ly['token_specialization']:.3f} "
                                                   f"({ly['token_specialization_baseline']:.3f})",
             "domain specialisation (shuffled)": f"{ly['domain_specialization']:.3f} "
                                                 f"({ly['domain_specialization_baseline']:.3f})"}
            for ly in stats["layers"]]
    rep.table(rows, caption="Per layer: balance, router entropy, dead experts, and how much of the routing the token "
              "id or the domain explains (against shuffled labels)")
    cvs = [ly["cv"] for ly in stats["layers"]]
    dead = sum(len(ly["dead_experts"]) for ly in stats["layers"])
    rep.headline("expert balance", f"load CV {min(cvs):.2f}-{max(cvs):.2f} per layer, {dead} dead experts")
    rep.figure("expert load per layer (moekit inspect)", load_heatmap(stats))
    rep.figure("domain specialisation (moekit inspect)", domain_plot(stats))
    rep.say("Full report (plots, super experts, expert health): `moekit inspect` writes inspect-out/report.html")


def _compress_step(rep: Report) -> None:
    """moekit-tiny with a quarter of its experts pruned or merged away, scored on held-out text it was not calibrated
    on."""
    import copy
    import warnings

    import moekit.hf as mh
    from moekit.bench.compress import stored_bytes
    from moekit.compress import CalibrationWarning, apply, calibrate, plan, token_windows
    from moekit.data import default_documents
    from moekit.default import DEFAULT_MODEL_DIR, default_model, default_tokenizer
    from moekit.eval import perplexity

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        rep.section("Compressing moekit-tiny")
        rep.say("(not packaged in this checkout; skipped)")
        return
    model, tok, docs = default_model(), default_tokenizer(), default_documents()
    experts = mh.view(model)[0].num_experts
    rep.section(f"Compressing: moekit-tiny to {experts - round(0.25 * experts)} of {experts} experts per layer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = calibrate(model, token_windows(tok, docs[0::2], model, 1024), progress=False)
    rows = []
    for method in ("original", "frequency", "msmoe"):
        compressed = model if method == "original" else apply(copy.deepcopy(model), plan(model, stats, method, 0.25))
        ppl = perplexity(compressed, tok, docs[1::2], seq_len=256, stride=224, max_tokens=2048, progress=False)
        rows.append({"method": method, "perplexity": round(ppl["ppl"], 2),
                     "MiB in bf16": round(stored_bytes(compressed, torch.bfloat16) / 2**20, 1)})
    rep.table(rows, caption="Calibrated on 1,024 tokens of half the held-out documents, scored on 2,048 tokens of "
              "the other half")
    best = min(rows[1:], key=lambda r: r["perplexity"])
    rep.headline("compression (25% of experts removed)", f"{best['method']}: perplexity {best['perplexity']} against "
                 f"{rows[0]['perplexity']}, {best['MiB in bf16']} MiB against {rows[0]['MiB in bf16']}")
    rep.say("`moekit compress --method M --ratio R --data CAL --out DIR` writes the checkpoint, plan.json and "
            "report.json; `moekit bench compress` compares every method (docs/compress.md)")


def _make_step(rep: Report) -> None:
    """The default model's dense twin MoEfied (`moekit make`) at half its FFN neurons per token, no training:
    perplexity against the dense model and the cosine of their last hidden states, on held-out text."""
    import moekit.make as mk
    from moekit.bench.make_lm import split_plan
    from moekit.compress import token_windows
    from moekit.data import default_documents
    from moekit.default import DEFAULT_DENSE_DIR, default_tokenizer
    from moekit.eval import perplexity
    from moekit.make.run import load_dense

    rep.section("Making an MoE: the dense twin of moekit-tiny split into experts (`moekit make`)")
    if not (DEFAULT_DENSE_DIR / "config.json").exists():
        rep.say("(the dense twin is not packaged in this checkout; skipped)")
        return
    dense, tok, docs = load_dense(DEFAULT_DENSE_DIR), default_tokenizer(), default_documents()
    windows = token_windows(tok, docs[0::2], dense, 1024)
    layers = list(range(dense.config.num_hidden_layers))
    inputs = mk.capture_inputs(dense, [ids for ids, _ in windows], layers, 1024)
    experts, shared, k = split_plan(dense.config, 0.5)
    held = docs[1::2]
    probe = tok(" ".join(d.text for d in held[:4]), truncation=True, max_length=256, return_tensors="pt").input_ids
    with torch.no_grad():
        base = dense(probe, output_hidden_states=True).hidden_states[-1][0]

    def scores(model) -> tuple[float, float]:
        ppl = perplexity(model, tok, held, seq_len=256, stride=224, max_tokens=2048, progress=False)["ppl"]
        with torch.no_grad():
            hidden = model(probe, output_hidden_states=True).hidden_states[-1][0]
        return ppl, float(torch.nn.functional.cosine_similarity(hidden, base, dim=-1).mean())

    dense_ppl, _ = scores(dense)
    rows = [{"model": "dense twin", "perplexity": round(dense_ppl, 2), "x dense": 1.0, "hidden-state cosine": 1.0}]
    moe, _ = mk.moefy(dense, experts, k, "kmeans", "centroid", inputs=inputs, shared=shared)
    ppl, cos = scores(moe)
    rows.append({"model": f"{moe.config.model_type}, {experts} experts + {shared} shared, top-{k}, k-means "
                 "partition, centroid router", "perplexity": round(ppl, 2), "x dense": round(ppl / dense_ppl, 3),
                 "hidden-state cosine": round(cos, 4)})
    rep.table(rows, caption="Half of each FFN's neurons active per token, no training; calibrated on 1,024 tokens "
              "of half the held-out documents, scored on 2,048 tokens of the other half (cosine: last hidden "
              "states over 256 tokens)")
    rep.headline("make (dense twin -> MoE, 50% active, no training)", f"perplexity x{rows[1]['x dense']} the "
                 f"dense twin's, hidden-state cosine {rows[1]['hidden-state cosine']}")
    rep.say("`moekit make MODEL --method kmeans --experts E --k K --out DIR` writes a native transformers MoE; "
            "`moekit make finetune` and `moekit make distill` repair it, `moekit bench make --lm` compares every "
            "method (docs/make.md)")
