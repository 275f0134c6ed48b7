"""One standard PEFT LoRA per domain on a base causal LM, saved as a PEFT adapter directory.

By default LoRA goes on the attention projections (every nn.Linear inside a `self_attn` module); with
`expert_params=True` it also goes on the fused 3D expert parameters of transformers v5 MoE blocks (gate_up_proj
[E, 2I, H], down_proj [E, H, I]) through PEFT's `target_parameters`. The output loads with
`peft.PeftModel.from_pretrained(base, out_dir)`; `lora_summary.json` beside it records how it was trained and
`lora_init.json` the seed A was initialised from (moekit.compose.adapters.init_lora_a: A_init regenerates exactly,
for ComPEFT's update A - A_init).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.compose.adapters import INIT_NAME, check_out_dir, init_lora_a
from moekit.compose.loop import evaluate_ppl, fit
from moekit.errors import ConfigError
from moekit.files import atomic_write, swap_in, temp_dir

ATTENTION_PARENTS = ("self_attn", "attention", "attn")


def attention_targets(model: nn.Module) -> list[str]:
    """Leaf names of the nn.Linear layers inside the attention modules (q_proj, k_proj, ... or DeepSeek's MLA
    q_a_proj, kv_b_proj, ...), for PEFT's target_modules."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and len(name.split(".")) >= 2 and name.split(".")[-2] in ATTENTION_PARENTS}
    if not names:
        raise ConfigError(f"{type(model).__name__}: no nn.Linear inside an attention module "
                          f"({', '.join(ATTENTION_PARENTS)}); expected a decoder LM, or pass target_modules")
    return sorted(names)


def expert_parameter_targets(model: nn.Module) -> list[str]:
    """'<module>.<parameter>' suffixes of the fused 3D expert parameters (e.g. experts.gate_up_proj), for PEFT's
    target_parameters; empty for a dense model."""
    found = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.dim() == 3 and len(parts) >= 2:
            found.add(".".join(parts[-2:]))
    return sorted(found)


def _load_base(base: str | os.PathLike | nn.Module):
    """(model, tokenizer or None, path or None)."""
    from moekit.compose.adapters import load_base

    if isinstance(base, nn.Module):
        return base, None, None
    path, model, tokenizer = load_base(base)
    return model, tokenizer, path


def train_domain_lora(base: str | os.PathLike | nn.Module, domain: str, out_dir: str | os.PathLike, steps: int = 200,
                      *, windows: Tensor | None = None, valid: Tensor | None = None, tokenizer=None,
                      rank: int = 8, alpha: float = 16.0, lr: float = 1e-3, batch_size: int = 8, seq_len: int = 128,
                      target_modules: list[str] | None = None, expert_params: bool = False,
                      target_parameters: list[str] | None = None, seed: int = 0, progress: bool = True,
                      force: bool = False) -> dict:
    """Train one LoRA on `domain` and save it as a PEFT adapter in out_dir; returns the JSON summary.

    base: a checkpoint directory (its tokenizer is used) or a model (then pass `windows` or `tokenizer`). windows
    [N, L]: training token windows (default: the domain's train split from moekit.compose.domains); valid: held-out
    windows to report perplexity before and after (default: the validation split when the corpus is read here).
    A model passed in is wrapped by PEFT in place and returned unwrapped (its base weights unchanged). A non-empty
    out_dir is refused unless force."""
    from peft import LoraConfig, get_peft_model

    if rank < 1 or not alpha > 0:
        raise ConfigError(f"rank={rank}, alpha={alpha}; expected a positive rank and alpha")
    if windows is None:
        from moekit.compose.domains import DOMAINS
        from moekit.errors import UnknownNameError

        if domain not in DOMAINS:
            raise UnknownNameError(f"domain {domain!r} does not exist; expected one of {', '.join(DOMAINS)}")
    model, loaded_tok, path = _load_base(base)
    final = check_out_dir(out_dir, [path] if path is not None else [], force)
    tokenizer = tokenizer or loaded_tok
    if windows is None:
        from moekit.compose.domains import domain_windows

        if tokenizer is None:
            raise ConfigError("train_domain_lora: no tokenizer; expected a checkpoint with tokenizer.json, or "
                              "windows= / tokenizer=")
        windows = domain_windows(tokenizer, [domain], "train", seq_len, max_windows=steps * batch_size,
                                 seed=seed)[domain]
        if valid is None:
            valid = domain_windows(tokenizer, [domain], "validation", seq_len, max_windows=64, seed=seed)[domain]
    targets = target_modules or attention_targets(model)
    params = list(target_parameters or [])
    if expert_params and not params:
        params = expert_parameter_targets(model)
        if not params:
            raise ConfigError(f"{type(model).__name__}: expert_params=True but the model has no fused 3D expert "
                              f"parameters; expected an MoE with transformers v5 experts")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, target_parameters=params or None,
                        lora_dropout=0.0, bias="none")
    before = evaluate_ppl(model, valid) if valid is not None else None
    peft_model = get_peft_model(model, config)
    init = init_lora_a(peft_model, seed)  # A_init regenerable from (seed, module name): lora_init.json
    if path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(path)
    started = time.perf_counter()
    trained = fit(peft_model, windows, peft_model.parameters(), steps, lr, batch_size, seed, progress=progress,
                  desc=f"lora {domain}")
    seconds = time.perf_counter() - started
    after = evaluate_ppl(peft_model, valid) if valid is not None else None
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    summary = {"domain": domain, "base": str(path) if path is not None else None, "out": str(final),
               "rank": rank, "alpha": alpha, "target_modules": targets, "target_parameters": params,
               "trainable_params": n_trainable, "steps": steps, "batch_size": batch_size,
               "seq_len": int(windows.shape[1]), "lr": lr, "seed": seed, "tokens": trained["tokens"],
               "first_loss": trained["first_loss"], "last_loss": trained["last_loss"],
               "valid_ppl_before": before, "valid_ppl_after": after, "seconds": round(seconds, 3)}
    with temp_dir(final, "lora") as tmp:
        peft_model.save_pretrained(str(tmp))
        atomic_write(tmp / "lora_summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write(tmp / INIT_NAME, json.dumps(init) + "\n")
        swap_in(tmp, final)
    peft_model.unload()  # the model passed in gets its plain linear layers back
    return summary


def load_adapter(base: nn.Module, adapter_dir: str | os.PathLike):
    """`peft.PeftModel.from_pretrained(base, adapter_dir)` in eval mode (a thin helper for the bench)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter_dir}: no adapter_config.json; expected a PEFT adapter directory")
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
