"""`moekit make` as a library call: a dense checkpoint directory in, an MoE checkpoint directory out (the model in
its native MoE family, the source's tokenizer, plan.json), written through a temporary sibling and renamed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from moekit.errors import ConfigError
from moekit.files import read_bounded, swap_in, temp_dir
from moekit.hf.checkpoint import CheckpointError
from moekit.make import TARGETS, capture_inputs, check, moefy, needs_data, token_domains, upcycle


def dense_config(path: str | os.PathLike):
    """The config of a dense decoder of a convertible family in a local directory with safetensors weights."""
    from transformers import AutoConfig

    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: expected a checkpoint directory with config.json")
    try:
        raw = json.loads(read_bounded(config_path, 1 << 20, "config.json"))
        model_type = raw.get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{config_path}: not a JSON object ({err})") from None
    import moekit.hf as mh

    if model_type not in TARGETS and model_type not in mh.FAMILIES:
        raise ConfigError(f"{config_path}: model_type {model_type!r} has no known FFN to split; expected one of "
                          f"{', '.join(sorted(TARGETS))}")
    if not any(directory.glob("*.safetensors")):
        raise CheckpointError(f"{directory}: no .safetensors weights; expected safetensors (pickled weights are "
                              "never loaded)")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: not a valid {model_type} config ({str(err).splitlines()[0]})") from None


_TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "vocab.txt")


def tokenizer_dir(source: str | os.PathLike, required: bool = True) -> Path | None:
    """Where the checkpoint's tokenizer lives: `source` itself, or for the embedded dense twin (which shares the
    default model's tokenizer) the default model's directory. CheckpointError when there is none and `required`."""
    from moekit.default import DEFAULT_DENSE_DIR, DEFAULT_MODEL_DIR

    source = Path(source)
    if any((source / name).is_file() for name in _TOKENIZER_VOCAB):
        return source
    if source.resolve() == DEFAULT_DENSE_DIR.resolve():
        return DEFAULT_MODEL_DIR
    if required:
        raise CheckpointError(f"{source}: no tokenizer files ({', '.join(_TOKENIZER_VOCAB)}); expected the "
                              "checkpoint's tokenizer next to its weights")
    return None


def copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer files of `source` (see `tokenizer_dir`) copied into `out`, if it has any."""
    from moekit.compress.run import TOKENIZER_FILES

    where = tokenizer_dir(source, required=False)
    for name in TOKENIZER_FILES if where is not None else ():
        if (where / name).is_file():
            shutil.copyfile(where / name, out / name)


def _model_type(path: str | os.PathLike) -> str | None:
    try:
        return json.loads(read_bounded(Path(path) / "config.json", 1 << 20, "config.json")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # dense_config says what is wrong


def load_dense(path: str | os.PathLike):
    """The dense decoder in `path` (safetensors only), in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: could not load the dense model ({str(err).splitlines()[0]})") from None


def make_checkpoint(model_path: str, out: str, experts: int | None, k: int, partition: str, router: str,
                    layers: list[int] | None, data: list[str] | None, max_tokens: int, seed: int,
                    force: bool, shared: int | None = None, branch=None, pregate: bool = False,
                    share_kv: bool = False) -> dict:
    """`moekit make`: partition in PARTITIONS, `upcycle`, `btx` (one branch per domain of `data`, trained with
    `branch`, a `make.finetune.Finetune`) or `bam` (btx with attention experts too, `share_kv` their keys and values,
    saved by `make.bam_save.write_bam` for trust_remote_code); `pregate`: also fit Read-ME's pre-gating router on
    `data` and save it beside the model (`make.pregate.PreGate.load(out, model)`)."""
    from transformers import AutoTokenizer

    from moekit.compress.calibrate import token_windows
    from moekit.compress.run import check_out
    from moekit.data import read_documents
    from moekit.hf import save

    if max_tokens < 2:
        raise ConfigError(f"--max-tokens={max_tokens}: expected at least 2 calibration tokens")
    if _model_type(model_path) == "bert":
        from moekit.make.encoder_save import make_encoder_checkpoint

        if experts is None or pregate:
            raise ConfigError("--experts / --pregate: an encoder needs --experts and has no pre-gate; expected "
                              "--experts and no --pregate")
        return make_encoder_checkpoint(model_path, out, experts, k, partition, router, layers, data, max_tokens,
                                       seed, force)
    if pregate and not data:
        raise ConfigError("--pregate: the pre-gate is fitted on calibration text; expected --data FILE")
    if needs_data(partition, router) and not data:
        raise ConfigError(f"--method {partition} / --router {router}: needs calibration text; expected --data FILE")
    branched = partition in ("btx", "bam")
    if share_kv and partition != "bam":
        raise ConfigError(f"--share-kv: shares the attention experts' keys and values; expected --method bam, not "
                          f"{partition}")
    if pregate and partition == "bam":
        raise ConfigError("--pregate: a BAM model is saved for trust_remote_code; expected no --pregate with bam")
    copies = partition in ("upcycle", "btx", "bam")
    source = Path(model_path)
    docs = read_documents(data) if data else []
    names = list(dict.fromkeys(str(d.domain) for d in docs))
    if branched:
        if len(names) < 2 or layers is not None:
            raise ConfigError(f"--method {partition}: {len(names)} domain(s){' and --layers' if layers else ''}; "
                              "expected --data with at least 2 domains (one file each, or .jsonl 'domain' labels) "
                              "and every layer")
        if experts is not None and experts != len(names):
            raise ConfigError(f"--experts={experts}: {partition.upper()} has one expert per domain; expected "
                              f"{len(names)} or none")
        experts = len(names)
    check(dense_config(source), experts, k, layers, copies=copies, shared=shared,
          parts=k if router == "dino" and not copies else None)
    out_dir = check_out(out, source, data or [], force)
    model = load_dense(source)
    inputs = domains = None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(source)) if docs else None
    if docs and not branched:
        windows = token_windows(tokenizer, docs, model, max_tokens)
        layer_ids = list(range(model.config.num_hidden_layers)) if layers is None else layers
        inputs = capture_inputs(model, [ids for ids, _ in windows], layer_ids, max_tokens)
        domains = token_domains(windows, max_tokens)
    if branched:
        from moekit.make.bam import bam
        from moekit.make.btx import btx
        from moekit.make.finetune import Finetune, token_stream

        by_domain = [[d for d in docs if str(d.domain) == name] for name in names]
        tokens = [token_stream(tokenizer, [d.text for d in ds]) for ds in by_domain]
        cal = [[ids for ids, _ in token_windows(tokenizer, ds, model, max_tokens // len(names))] for ds in by_domain]
        settings = branch or Finetune(steps=50)
        moe, plan = btx(model, tokens, k, settings, router, cal, seed) if partition == "btx" else \
            bam(model, tokens, k, settings, router, cal, share_kv, seed)
        plan["domains"] = names
    elif copies:
        moe, plan = upcycle(model, experts, k, router, layers, inputs, seed, shared=shared)
    else:
        moe, plan = moefy(model, experts, k, partition, router, layers, inputs, seed, shared=shared,
                          domains=domains)
    gate = None
    if pregate:
        from moekit.make.pregate import PREGATE_CONFIG, fit_pregate_for

        gate = fit_pregate_for(moe, [ids for ids, _ in token_windows(tokenizer, docs, model, max_tokens)],
                               max_tokens=max_tokens, seed=seed)
        plan["pregate"] = PREGATE_CONFIG
    with temp_dir(out_dir, "make") as tmp:
        if partition == "bam":
            from moekit.make.bam_save import write_bam

            write_bam(moe, tmp, plan)
        else:
            save(moe, tmp, force=True)
        if gate is not None:
            gate.save(tmp)
        return finish_make(source, tmp, out_dir, plan)


def finish_make(source: Path, tmp: Path, out_dir: Path, plan: dict) -> dict:
    """The tokenizer and plan.json beside the model written in `tmp`, then `tmp` swapped in as `out_dir` (an empty
    `out_dir` removed first); the plan's summary (its layers as sorted ints) for the CLI's report."""
    copy_tokenizer(source, tmp)
    (tmp / "plan.json").write_text(json.dumps(plan))
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    swap_in(tmp, out_dir)
    return {k_: v for k_, v in plan.items() if k_ != "layers"} | {"out": str(out_dir),
                                                                    "layers": sorted(map(int, plan["layers"]))}
