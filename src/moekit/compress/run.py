"""`compress_checkpoint`: what `moekit compress` does, end to end, writing nothing outside `out` and nothing into
`out` until everything is ready (a sibling temporary directory renamed into place; the input is only read).

Data: `data` calibrates (the methods read routing statistics, hidden states or gradients from it); perplexity is
measured on held-out documents: `eval_data`, else moekit-tiny's held-out split when the model is moekit-tiny,
else none (ppl null). Documents whose text is also in the calibration data are left out of the evaluation.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from moekit.compress import METHODS, apply, calibrate, check_ratio, find_super_experts, plan, token_windows
from moekit.compress.skip import SKIP_FILE
from moekit.data import DataError, TextDoc, default_documents, read_documents
from moekit.errors import ConfigError
from moekit.eval import load_model_and_tokenizer, perplexity, skipped_perplexity
from moekit.files import check_output, clean_stale, swap_in, temp_dir
from moekit.hf.checkpoint import save
from moekit.hf.headers import CheckpointError, read_checkpoint
from moekit.hf.view import view

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def checkpoint_dtype(directory: Path) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes."""
    by: dict[str, int] = {}
    for info in read_checkpoint(directory).values():
        if info.dtype in _DTYPES:
            by[info.dtype] = by.get(info.dtype, 0) + info.nbytes
    return _DTYPES[max(by, key=by.get)] if by else torch.float32


def param_counts(model: nn.Module) -> dict[str, int]:
    """{"params": every parameter once, "active": the parameters one token uses (all but the routed experts,
    plus k experts' worth per MoE layer at the layer's mean expert size)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    active = total
    for block in view(model):
        routed = sum(p.numel() for p in block.experts.module.parameters())
        active -= routed * (block.num_experts - block.k) // block.num_experts  # as `moekit info` counts
    return {"params": total, "active": active}


def check_out(out: str | os.PathLike, model_dir: str | os.PathLike, data: list, force: bool) -> Path:
    """The resolved output directory, checked before any work (see `moekit.files.check_output`), after removing
    what an interrupted compress left beside it."""
    out, source = Path(out).resolve(), Path(model_dir).resolve()
    if out == source or source in out.parents or out in source.parents:
        raise CheckpointError(f"{out}: is or holds the input checkpoint {source}, or lies inside it; expected "
                              "another output directory")
    out = check_output(out, data)
    clean_stale(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out}: not empty; expected an empty or new directory (or --force)")
    return out


def _held_out(eval_data: list[str] | None, is_default: bool, calibration: list[TextDoc]) -> list[TextDoc]:
    docs = read_documents(eval_data) if eval_data else (default_documents() if is_default else [])
    seen = {d.text for d in calibration}
    return [d for d in docs if d.text not in seen]


def _ppl(model: nn.Module, tokenizer, docs: list[TextDoc], max_tokens: int, skip: dict | None = None
         ) -> dict | None:
    """Perplexity of a float32 copy of `model`; with skip thresholds, under skipping, plus the measured experts per
    token of each layer."""
    if not docs or tokenizer is None:
        return None
    scored = copy.deepcopy(model).float()
    if skip is None:
        return perplexity(scored, tokenizer, docs, max_tokens=max_tokens)
    return skipped_perplexity(scored, tokenizer, docs, skip, max_tokens=max_tokens)


def compress_checkpoint(model_path: str | None, out: str | os.PathLike, method: str | None = None,
                        ratio: float | None = None, quant: str | None = None, data: list[str] | None = None,
                        eval_data: list[str] | None = None, task: str | None = None, protect_super: bool = False,
                        force: bool = False, cal_tokens: int = 8192, eval_tokens: int = 16384,
                        progress: bool = True, skip: float | None = None, lowrank: float | None = None,
                        keep: int | None = None, rank: int | None = None, steps: int | None = None) -> dict:
    """Compress the checkpoint at `model_path` (None: moekit-tiny) into `out` (checkpoint, plan.json,
    report.json); returns the report. `skip`: also calibrate dynamic skipping so that fraction of the second and
    later experts is skipped (thresholds in skip.json, applied at inference; perplexity after is measured with it).
    `lowrank`: afterwards cut every expert to rank round(lowrank * min(H, I)) factors (MC-SMoE's SVD step).
    `keep` / `rank` / `steps`: options of the trained methods (`moekit.compress.trained`: mote, compressed-experts),
    which take no ratio."""
    from moekit.compress.trained import TRAINED, check_options, run_trained

    check_options(method, keep, rank, steps)
    trained = method in TRAINED
    if method is None and quant is None and skip is None and lowrank is None:
        raise ConfigError("--method / --quant / --lowrank / --skip: expected at least one of them")
    for flag, tokens in (("--cal-tokens", cal_tokens), ("--eval-tokens", eval_tokens)):
        if tokens < 1:
            raise ConfigError(f"{flag} {tokens}: expected a positive number of tokens")
    if lowrank is not None:
        if not 0 < lowrank < 1:
            raise ConfigError(f"--lowrank {lowrank}: expected a fraction in (0, 1) of the full rank min(H, I)")
        if quant is not None or method == "heapr":
            raise ConfigError(f"--lowrank: cannot follow {'--quant' if quant else 'heapr'}; expected it with a "
                              "merging or pruning method (or alone)")
    if skip is not None:
        if not 0 < skip < 1:
            raise ConfigError(f"--skip {skip}: expected a fraction in (0, 1) of second and later experts to skip")
        if not data:
            raise DataError("--data: --skip needs calibration data to set its thresholds; expected --data FILE")
    if trained:
        if any(v is not None for v in (ratio, quant, skip, lowrank, task)) or protect_super:
            raise ConfigError(f"--method {method}: takes no --ratio, --quant, --skip, --lowrank, --task or "
                              "--protect-super; expected it alone")
        if not data:
            raise DataError(f"--data: method {method} trains on calibration data; expected --data FILE")
    elif method is not None:
        if method not in METHODS:
            raise ConfigError(f"--method {method}: expected one of {', '.join([*METHODS, *TRAINED])}")
        if ratio is None:
            raise ConfigError(f"--ratio: method {method} needs a ratio in (0, 1)")
        check_ratio(ratio, "--ratio")
        if not data:
            raise DataError(f"--data: method {method} needs calibration data (a .jsonl or text file); expected "
                            f"--data FILE (held-out evaluation text must be other documents)")
    elif ratio is not None:
        raise ConfigError("--ratio: given without --method; expected both or neither")
    elif protect_super:
        raise ConfigError("--protect-super: protects experts from a --method; expected --method and --ratio")
    if quant is not None:
        from moekit.compress.quantize import parse_spec

        parse_spec(quant)
    from moekit.default import default_model_path

    out = check_out(out, model_path or default_model_path(), [*(data or ()), *(eval_data or ())], force)
    cal_docs = read_documents(data) if data else []
    path, model, tokenizer, is_default = load_model_and_tokenizer(model_path)
    eval_docs = _held_out(eval_data, is_default, cal_docs)
    if trained:
        from moekit.compress.trained import check_model

        check_model(model, method, keep, rank)
    if cal_docs and tokenizer is None:
        raise DataError(f"{path}: no tokenizer files; expected tokenizer.json to read the calibration text")
    dtype = checkpoint_dtype(path)
    before = param_counts(model)
    experts_before = {b.layer: b.num_experts for b in view(model)}
    caught: list[str] = []
    stats = None
    if cal_docs:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            stats = calibrate(model, token_windows(tokenizer, cal_docs, model, cal_tokens),
                              grads=method == "heapr", progress=progress)
        caught = [str(r.message) for r in records]
    ppl_before = _ppl(model, tokenizer, eval_docs, eval_tokens)
    p, protect, supers = None, None, None
    if protect_super:
        protect, supers = find_super_experts(model, cal_docs, tokenizer, max_tokens=cal_tokens, progress=progress)
    summary, quant_plan = None, None
    if trained:
        summary = run_trained(model, stats, method, keep, rank, steps, progress=progress)
        quant_plan = summary.pop("quant_plan", None)
    elif method is not None:
        p = plan(model, stats, method, ratio, task=task, protect=protect)
        apply(model, p)
    ranks = None
    if lowrank is not None:
        from moekit.compress.lowrank import apply_lowrank, plan_lowrank

        low = plan_lowrank(model, lowrank)
        apply_lowrank(model, low)
        ranks = {layer: entry["rank"] for layer, entry in low.layers.items()}
    after = param_counts(model)
    if method == "compressed-experts":
        from moekit.compress.compressed_hf import active_params_saved

        after["active"] = before["active"] - active_params_saved(model, summary["keep"], summary["rank"])
    if quant is not None:
        from moekit.compress.quantize import apply_quant, plan_quant

        quant_stats = stats
        if stats is not None and p is not None and quant.startswith("mixed"):
            with warnings.catch_warnings():  # the compressed model routes differently: calibrate it again
                warnings.simplefilter("ignore")
                quant_stats = calibrate(model, token_windows(tokenizer, cal_docs, model, cal_tokens),
                                        progress=progress)
        quant_plan = plan_quant(model, quant_stats, quant)
        apply_quant(model, quant_plan)
    model = model.to(dtype)
    thresholds, skip_spec = None, None
    if skip is not None:
        from moekit.compress.skip import calibrate_skip

        rule = False  # NAEE's rule: the kept experts keep their own weights (measured cheaper; apply_skip's default)
        thresholds = calibrate_skip(copy.deepcopy(model).float(), cal_docs, tokenizer, target=skip,
                                    max_tokens=cal_tokens, renormalize=rule)
        skip_spec = {"thresholds": thresholds, "renormalize": rule}
    ppl_after = _ppl(model, tokenizer, eval_docs, eval_tokens, skip_spec)
    blocks = view(model)
    measured = (ppl_after or {}).get("skip", {}).get("experts_per_token")  # else every token uses k experts
    report = {
        "model": str(path), "method": method, "ratio": ratio, "quant": quant, "task": task,
        "protect_super": protect_super, "super_experts": supers,
        "calibration": {"files": data, "tokens": stats.tokens if stats else 0},
        "evaluation": {"files": eval_data or ("moekit-tiny held-out split" if is_default else None),
                       "documents": len(eval_docs), "tokens": ppl_before["tokens"] if ppl_before else 0},
        "bytes_before": checkpoint_bytes(path), "bytes_after": None,
        "params_before": before["params"], "params_after": after["params"],
        "active_params_before": before["active"], "active_params_after": after["active"],
        "ppl_before": ppl_before["ppl"] if ppl_before else None, "ppl_after": ppl_after["ppl"] if ppl_after else None,
        "ppl_domains_before": (ppl_before or {}).get("domains"), "ppl_domains_after": (ppl_after or {}).get("domains"),
        "experts_per_layer_before": experts_before, "experts_per_layer": {b.layer: b.num_experts for b in blocks},
        "experts_per_token": {b.layer: measured[i] if measured else b.k for i, b in enumerate(blocks)},
        "skip_target": skip, "skip_thresholds": thresholds, "lowrank": lowrank, "lowrank_ranks": ranks,
        "dtype": str(dtype).removeprefix("torch."), "trained": summary,
        "warnings": caught,
    }
    _write(model, out, force, report, p, quant_plan, path, skip_spec)
    return report


def _unwrap_compressed(model: nn.Module) -> dict:
    """Compressed experts: the original experts back in place (the checkpoint stays native); returns the
    compressed tensors by layer, written beside the checkpoint."""
    from moekit.compress.compressed_hf import uninstall

    return uninstall(model)


# what a tokenizer may be made of in a transformers checkpoint; copied so the output runs on its own
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _write(model: nn.Module, out: Path, force: bool, report: dict, p, quant_plan, source: Path,
           skip_spec: dict | None) -> None:
    """Checkpoint (with the source's tokenizer files), plan.json and report.json into a temporary sibling, then
    renamed to `out`."""
    with temp_dir(out, "compress") as tmp:
        compressed = _unwrap_compressed(model) if report["method"] == "compressed-experts" else None
        save(model, tmp, force=True)
        if compressed:
            from moekit.compress.compressed_hf import write_sidecar

            write_sidecar(tmp, compressed, report["trained"]["keep"], report["trained"]["rank"])
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        report["bytes_after"] = checkpoint_bytes(tmp)
        report["layout"] = "moekit-manifest" if (tmp / "moekit.json").exists() else "native"
        if p is not None:
            p.save(tmp / "plan.json")
        if quant_plan is not None:
            (tmp / "quant_plan.json").write_text(quant_plan.to_json())
        if skip_spec is not None:
            (tmp / SKIP_FILE).write_text(json.dumps({
                "target": report["skip_target"], **skip_spec,
                "apply": f"moekit.compress.skip.apply_skip(model, thresholds, renormalize={skip_spec['renormalize']})"},
                indent=1))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists() and not force:
            raise CheckpointError(f"{out}: appeared while compressing; expected it absent (or --force)")
        swap_in(tmp, out)
