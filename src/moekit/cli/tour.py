"""`moekit tour`: a short walk through what moekit does, on the embedded default model `moekit-tiny` and on a
standalone MoE layer. Prints as it goes and writes a self-contained `tour/report.html`."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import torch

from moekit.bench.layer import CASES, run_case
from moekit.cli.bench import format_table
from moekit.core.layer import MoE

HELP = "a quick tour: the default model, an MoE layer, the dispatch benchmark, the Hugging Face bridge"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per benchmark contender (default 5)")
    p.add_argument("--out", default="tour", help="where report.html goes (default: tour)")


class _Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy for the report."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    import sys

    from moekit.errors import ConfigError
    from moekit.files import check_output

    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: expected a positive number of timed rounds")
    out = check_output(args.out)
    tee = _Tee(sys.stdout)
    with redirect_stdout(tee):
        images = _default_model_step()
        _layer_step()
        _bench_step(args.repeats)
        _bridge_step()
        images.update(_inspect_step())
        _compress_step()
    _write_report(out, "".join(tee.parts), images)
    print(f"\nReport: {Path(args.out) / 'report.html'}")
    return 0


def _default_model_step() -> dict[str, bytes]:
    from moekit.default import DEFAULT_MODEL_DIR, default_model, default_test_split, default_tokenizer
    from moekit.hf.info import describe
    from moekit.train.package import perplexity

    print("1. The embedded default model, moekit-tiny (trained here by `moekit train --recipe tiny`)")
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        print("   (not packaged in this checkout; skipped)")
        return {}
    info = describe(str(DEFAULT_MODEL_DIR))
    experts = sorted(set(info["experts_per_layer"].values()))
    print(f"   {info['family']}: {info['num_layers']} layers, {info['total_params']:,} parameters "
          f"({info['active_params']:,} active per token), {experts} experts per layer, k={info['k']}, "
          f"{info['dtype']}, {info['total_bytes'] / 2**20:.1f} MiB")
    model, tok = default_model(), default_tokenizer()
    docs = default_test_split()
    summary_path = DEFAULT_MODEL_DIR / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for domain in ("prose", "code"):
        texts = [d["text"] for d in docs if d["domain"] == domain]
        ppl = perplexity(model, tok.backend_tokenizer, texts, 256, max_tokens=4096)
        card = summary.get("held_out_perplexity", {})
        note = (f" (model card, 30k tokens: {card['moe'][domain]:.1f}; the dense model of equal active FLOPs: "
                f"{card['dense'][domain]:.1f})") if card else ""
        print(f"   held-out {domain}: perplexity {ppl:.1f} on 4k tokens{note}")
        prompt = tok(texts[0][:120], return_tensors="pt").input_ids[:, :24]
        with torch.no_grad():
            ids = model.generate(prompt, max_new_tokens=40, do_sample=False)
        sample = tok.decode(ids[0], skip_special_tokens=True)
        print(f"   {domain} sample (greedy, after a 24-token prompt from a held-out document):")
        print("      " + sample.replace("\n", "\n      "))
    curve = DEFAULT_MODEL_DIR / "training_curve.png"
    return {"training curve (moekit-tiny against a dense model of equal active FLOPs)": curve.read_bytes()} \
        if curve.exists() else {}


def _layer_step() -> None:
    torch.manual_seed(0)
    print("\n2. An MoE layer: 8 SwiGLU experts, top-2 softmax routing, one shared expert")
    moe = MoE(hidden_size=256, intermediate_size=512, num_experts=8, k=2, num_shared_experts=1)
    print(moe)
    x = torch.randn(4, 128, 256)
    out = moe(x)
    print(f"   routed {out.routing.num_tokens} tokens: output {tuple(out.hidden.shape)}, aux loss "
          f"{out.aux_loss.item():.4f} ({', '.join(f'{k}={v.item():.3f}' for k, v in out.losses.items())})")
    counts = out.expert_counts.tolist()
    print("   tokens per expert:", counts, f"(max/mean = {max(counts) / (sum(counts) / len(counts)):.2f})")
    capped = MoE(256, 512, 8, k=2, capacity_factor=0.5)
    capped.load_state_dict(moe.state_dict(), strict=False)
    print(f"   with capacity factor 0.5: {capped(x).dropped} of {2 * out.routing.num_tokens} assignments dropped")


def _bench_step(repeats: int) -> None:
    print("\n3. The dispatch path against transformers' Mixtral/DeepSeek blocks and a dense FFN of equal active "
          "FLOPs (shapes 1/4 of `moekit bench layer`, medians of interleaved runs):")
    records = []
    for case in CASES:
        records.extend(run_case(case.scaled(4), repeats))
    print(format_table(records))
    print("   Full benchmark: `moekit bench layer --json` (or `make bench`); results in docs/benchmarks.md.")


def _bridge_step() -> None:
    """The default model (or a small random Qwen3-MoE) run by transformers, then through moekit's dispatch."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import moekit.hf as mh
    from moekit.default import DEFAULT_MODEL_DIR, default_model

    print("\n4. The Hugging Face bridge: transformers' own forward, then moekit.hf.accelerate")
    torch.manual_seed(0)
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        model, name = default_model(), "moekit-tiny"
    else:
        config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256)
        model, name = AutoModelForCausalLM.from_config(config).eval(), "a small random Qwen3-MoE"
    for block in mh.view(model):
        print(f"   {name} layer {block.layer}: {block.num_experts} experts, k={block.k}, gate_up_proj "
              f"{tuple(block.experts.gate_up_proj.shape)} (the model's own tensor, not a copy)")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
        mh.accelerate(model)
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
        mh.restore(model)
    print(f"   after accelerate: max |logit difference| {float((logits - ref_logits).abs().max()):.2e}, "
          f"greedy tokens identical: {torch.equal(tokens, ref_tokens)}; restore puts transformers' path back")


def _inspect_step() -> dict[str, bytes]:
    """Routing statistics of moekit-tiny on 2k held-out tokens (prose and code); `moekit inspect` does it all."""
    from moekit.default import DEFAULT_MODEL_DIR, default_model, default_tokenizer
    from moekit.inspect import compute_stats, trace
    from moekit.inspect.plots import domain_plot, load_heatmap
    from moekit.inspect.summary import summary_lines

    print("\n5. Inspecting the routing: moekit-tiny on 2,048 held-out tokens, half prose, half code")
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        print("   (not packaged in this checkout; skipped)")
        return {}
    from moekit.hf import accelerate

    model = accelerate(default_model())
    stats = compute_stats(trace(model, None, default_tokenizer(), max_tokens=2048, progress=False))
    for line in summary_lines(stats):
        print("   " + line)
    print("   Full report (plots, super experts, expert health): `moekit inspect` writes inspect-out/report.html")
    return {"expert load per layer (moekit inspect)": load_heatmap(stats),
            "domain specialisation (moekit inspect)": domain_plot(stats)}


def _compress_step() -> None:
    """moekit-tiny pruned and merged to 6 experts per layer, scored on held-out text it was not calibrated on."""
    import copy
    import warnings

    from moekit.bench.compress import stored_bytes
    from moekit.compress import CalibrationWarning, apply, calibrate, plan, token_windows
    from moekit.data import default_documents
    from moekit.default import DEFAULT_MODEL_DIR, default_model, default_tokenizer
    from moekit.eval import perplexity

    print("\n6. Compressing: moekit-tiny to 6 of 8 experts per layer (calibrated on 1,024 tokens of half the held-out "
          "documents, scored on 2,048 tokens of the other half)")
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        print("   (not packaged in this checkout; skipped)")
        return
    model, tok, docs = default_model(), default_tokenizer(), default_documents()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = calibrate(model, token_windows(tok, docs[0::2], model, 1024), progress=False)
    for method in ("original", "frequency", "msmoe"):
        compressed = model if method == "original" else apply(copy.deepcopy(model), plan(model, stats, method, 0.25))
        ppl = perplexity(compressed, tok, docs[1::2], seq_len=256, stride=224, max_tokens=2048, progress=False)
        mib = stored_bytes(compressed, torch.bfloat16) / 2**20
        print(f"   {method:9s} perplexity {ppl['ppl']:6.2f}, {mib:5.1f} MiB in bf16")
    print("   `moekit compress --method M --ratio R --data CAL --out DIR` writes the checkpoint, plan.json and "
          "report.json; `moekit bench compress` compares every method (docs/compress.md)")


def _write_report(out: Path, text: str, images: dict[str, bytes]) -> None:
    """One self-contained HTML file (images inline), written atomically."""
    from moekit.files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    figures = "".join(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
                      f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
                      for title, png in images.items())
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>moekit tour</title><style>"
            "body{font-family:sans-serif;max-width:70rem;margin:2rem auto}pre{background:#f6f6f6;padding:1rem;"
            "overflow-x:auto}img{max-width:100%}</style></head><body><h1>moekit tour</h1>"
            f"{figures}<pre>{html.escape(text)}</pre></body></html>")
    atomic_write(out / "report.html", page)
