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


def load_dense(path: str | os.PathLike):
    """The dense decoder in `path` (safetensors only), in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: could not load the dense model ({str(err).splitlines()[0]})") from None


def make_checkpoint(model_path: str, out: str, experts: int, k: int, partition: str, router: str,
                    layers: list[int] | None, data: list[str] | None, max_tokens: int, seed: int,
                    force: bool, shared: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from moekit.compress.calibrate import token_windows
    from moekit.compress.run import TOKENIZER_FILES, check_out
    from moekit.data import read_documents
    from moekit.hf import save

    if max_tokens < 2:
        raise ConfigError(f"--max-tokens={max_tokens}: expected at least 2 calibration tokens")
    if needs_data(partition, router) and not data:
        raise ConfigError(f"--method {partition} / --router {router}: needs calibration text; expected --data FILE")
    copies = partition == "upcycle"
    source = Path(model_path)
    check(dense_config(source), experts, k, layers, copies=copies, shared=shared)
    out_dir = check_out(out, source, data or [], force)
    docs = read_documents(data) if data else []
    model = load_dense(source)
    inputs = domains = None
    if docs:
        tokenizer = AutoTokenizer.from_pretrained(source)
        windows = token_windows(tokenizer, docs, model, max_tokens)
        layer_ids = list(range(model.config.num_hidden_layers)) if layers is None else layers
        inputs = capture_inputs(model, [ids for ids, _ in windows], layer_ids, max_tokens)
        domains = token_domains(windows, max_tokens)
    if copies:
        moe, plan = upcycle(model, experts, k, router, layers, inputs, seed, shared=shared)
    else:
        moe, plan = moefy(model, experts, k, partition, router, layers, inputs, seed, shared=shared,
                          domains=domains)
    with temp_dir(out_dir, "make") as tmp:
        save(moe, tmp, force=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        (tmp / "plan.json").write_text(json.dumps(plan))
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        swap_in(tmp, out_dir)
    return {k_: v for k_, v in plan.items() if k_ != "layers"} | {"out": str(out_dir),
                                                                    "layers": sorted(map(int, plan["layers"]))}
