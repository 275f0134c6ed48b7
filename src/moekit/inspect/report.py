"""The inspect report: `report.html` (self-contained, plots embedded as PNG), `stats.json` and the plots as files,
written into a directory atomically; and `inspect_model`, what `moekit inspect` runs."""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

from moekit.errors import MoekitError
from moekit.files import check_output, clean_stale, swap_in, temp_dir
from moekit.inspect.plots import all_plots
from moekit.inspect.summary import compute_stats
from moekit.inspect.trace import trace

DEFAULT_OUT = "inspect-out"
DEFAULT_MAX_TOKENS = 16384

# Records how many <img> decoded (naturalWidth > 0) in <body data-images-loaded>, for a headless browser check.
IMAGE_CHECK = ("<script>window.addEventListener('load',function(){var im=document.images,n=0;"
                "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}"
                "document.body.setAttribute('data-images-loaded',n);"
                "document.body.setAttribute('data-images-total',im.length);});</script>")

_CAPTIONS = {
    "load_heatmap.png": "Each expert's share of its layer's routed assignments, times E (1 is a perfectly balanced "
                        "expert, 0 a dead one).",
    "entropy.png": "Router entropy per token: near 0 the router is sure of its choice, log E it cannot decide.",
    "coactivation.png": "How often expert b is chosen for a token given that expert a is (Dynamic-DINO's "
                        "collaboration patterns: fixed partners show as bright cells).",
    "transitions.png": "P(expert at the next layer | expert at this layer): what an expert prefetcher needs. A "
                       "row concentrated on one cell is a predictable path.",
    "domain_share.png": "Each domain's load over the experts. Different bars per domain mean domain-specialised "
                        "experts; the title gives I(expert; domain) / H(domain).",
    "specialization.png": "OpenMoE's context-independent specialisation: 1 - H(expert | token id) / H(expert), "
                          "against the same measure with token ids shuffled (what finite counts alone give).",
    "position.png": "OpenMoE's drop-towards-the-end: the share of assignments a capacity of 1.0 x (L k / E) per "
                    "input would drop, and the load imbalance, against the position.",
    "super_experts.png": "Largest |down_proj output| of every expert (Unveiling Super Experts); experts above the "
                         "red line are super experts, confirmed by ablation in the table below.",
    "expert_health.png": "HoME's expert collapse: fraction of near-zero activations inside each expert.",
}



class ReportError(MoekitError, ValueError):
    """An output directory inspect cannot write."""


def _layer_table(stats: dict) -> str:
    head = ("<tr><th>layer</th><th>CV</th><th>max/mean</th><th>entropy (mean)</th><th>experts for 50% / 90% "
            "of load</th><th>dead</th><th>near-dead</th><th>token spec. (shuffled)</th><th>domain spec. (labels "
            "shuffled)</th></tr>")
    rows = []
    for ly in stats["layers"]:
        m = ly["mass_coverage"]
        rows.append(f"<tr><td>{ly['layer']}</td><td>{ly['cv']:.3f}</td><td>{ly['max_over_mean']:.2f}</td>"
                    f"<td>{ly['entropy_mean']:.3f}</td><td>{m['load_50']} / {m['load_90']}</td>"
                    f"<td>{ly['dead_experts'] or '-'}</td><td>{ly['near_dead_experts'] or '-'}</td>"
                    f"<td>{ly['token_specialization']:.3f} ({ly['token_specialization_baseline']:.3f})</td>"
                    f"<td>{ly['domain_specialization']:.3f} ({ly['domain_specialization_baseline']:.3f})</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _super_table(stats: dict) -> str:
    if not stats.get("super_experts_checked"):
        return "<p>Super experts were not checked (no model given).</p>"
    head = ("<tr><th>layer</th><th>expert</th><th>max |down_proj out|</th><th>x median</th><th>loss change when "
            "removed</th><th>ordinary expert</th><th>its loss change</th></tr>")

    def row(s: dict) -> str:
        return (f"<tr><td>{s['layer']}</td><td>{s['expert']}</td><td>{s['max_abs']:.2f}</td><td>{s['ratio']:.1f}"
                f"</td><td>{s['ablation_loss_delta']:+.4f}</td><td>{s['ordinary_expert']}</td>"
                f"<td>{s['ordinary_loss_delta']:+.4f}</td></tr>")
    if stats["super_experts"]:
        return f"<table>{head}{''.join(row(s) for s in stats['super_experts'])}</table>"
    return (f"<p>No super expert: no expert's largest activation reaches {stats['super_expert_factor']:g} x the "
            f"median. The largest outlier, for comparison:</p><table>{head}{row(stats['top_outlier'])}</table>")


def _tokens_table(stats: dict) -> str:
    def cell(toks: list[dict]) -> str:
        return " ".join(f"{html.escape(repr(t.get('text', t['token_id'])))} ({t['share']:.0%})" for t in toks) or "-"

    parts = []
    for ly in stats["layers"]:
        rows = "".join(f"<tr><td>{e}</td><td>{cell(toks)}</td></tr>" for e, toks in enumerate(ly["top_tokens"]))
        parts.append(f"<details><summary>layer {ly['layer']}</summary><table><tr><th>expert</th><th>most frequent "
                     f"tokens (share of the token's occurrences routed here)</th></tr>{rows}</table></details>")
    return "".join(parts)


def render_html(stats: dict, plots: dict[str, bytes]) -> str:
    figures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(_CAPTIONS.get(name, name))}</figcaption></figure>" for name, png in plots.items())
    health = stats.get("expert_health", {}).get("shared_share") or {}
    shared = "".join(f"<li>{html.escape(d)}: " + ", ".join("-" if v is None else f"{v:.3f}" for v in vals) + "</li>"
                     for d, vals in health.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>moekit inspect</title><style>"
        "body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}table{border-collapse:collapse;"
        "margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;font-size:.9rem}img{max-width:100%}"
        "figure{margin:1.5rem 0}figcaption{color:#444;font-size:.9rem}</style></head><body>"
        f"<h1>moekit inspect</h1><p>Model <code>{html.escape(stats['model'])}</code>, {stats['tokens']:,} tokens, "
        f"{len(stats['layers'])} MoE layers, domains: {html.escape(', '.join(stats['domains']) or 'none')}.</p>"
        f"<h2>Layers</h2>{_layer_table(stats)}<h2>Super experts</h2>{_super_table(stats)}"
        + (f"<h2>Shared-expert share of the output, per domain and layer</h2><ul>{shared}</ul>" if shared else "")
        + f"<h2>Plots</h2>{figures}<h2>Top tokens per expert</h2>{_tokens_table(stats)}"
        f"{IMAGE_CHECK}</body></html>")


def check_out_dir(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Path:
    """The resolved output directory, checked before any work: not one of `inputs`, inside one or holding one; a
    new directory, an empty one or an earlier report; somewhere moekit may write."""
    out = check_output(out_dir, inputs, error=ReportError)
    if out.exists() and any(out.iterdir()) and not (out / "report.html").exists():
        raise ReportError(f"--out {out_dir}: exists and is not an inspect report; expected a new or empty directory")
    return out


def write_report(stats: dict, out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write report.html, stats.json and the plots into `out_dir` (replacing an earlier report there, atomically).
    Refuses an `out_dir` that is, or holds, one of `inputs`, or a non-empty directory that is not a report."""
    out = check_out_dir(out_dir, inputs)
    plots = all_plots(stats)
    clean_stale(out)
    with temp_dir(out, "inspect") as tmp:
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, allow_nan=False))
        for name, png in plots.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.html").write_text(render_html(stats, plots))
        swap_in(tmp, out)
    return out / "report.html"


def inspect_model(model_path: str | os.PathLike | None = None, data: Sequence[str | os.PathLike] | None = None,
                  out_dir: str | os.PathLike = DEFAULT_OUT, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                  progress: bool = True) -> tuple[Path, dict]:
    """Trace the model at `model_path` (None: moekit-tiny) on the data files (None: its held-out documents), compute
    every statistic and write the report. Returns the report's path and the stats."""
    from moekit.data import read_documents
    from moekit.default import default_model, default_model_path, default_tokenizer

    inputs = [*(data or ()), *([model_path] if model_path else [default_model_path()])]
    check_out_dir(out_dir, inputs)
    docs = read_documents(data) if data else None
    if model_path is None:
        model, tokenizer = default_model(), default_tokenizer()
    else:
        from transformers import AutoTokenizer

        from moekit.hf import load
        from moekit.hf.validate import check_checkpoint, check_tokenizer_files

        check_checkpoint(model_path)  # before any work: what load refuses, then the tokenizer files (without them
        check_tokenizer_files(model_path)  # transformers may build an empty tokenizer: every text no tokens)
        model = load(model_path).float().eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as err:
            raise ReportError(f"{model_path}: no tokenizer there ({type(err).__name__}); expected the tokenizer "
                              "files next to the checkpoint") from None
    from moekit.hf import accelerate

    accelerate(model)  # our own copy: moekit's dispatch runs the experts faster, the family's router still routes
    t = trace(model, docs, tokenizer, max_tokens=max_tokens, progress=progress)
    cap = t.num_tokens  # the activation and ablation passes never read more than was traced
    stats = compute_stats(t, model, docs, tokenizer, activation_tokens=min(4096, cap),
                          ablation_tokens=min(2048, cap), progress=progress)
    return write_report(stats, out_dir, inputs), stats
