"""`moekit lora mix`: build a LoRA-MoE over saved adapters on a checkpoint, train its routers on the adapters'
domains (aux losses added, LoRA-Mixer's labels given), report held-out perplexity and routing accuracy, save it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from moekit.compose.adapters import check_out_dir, load_base
from moekit.compose.loop import evaluate_ppl, fit
from moekit.compose.lora_moe import LoraMoE, is_routed
from moekit.errors import ConfigError


@torch.no_grad()
def routing_accuracy(moe: LoraMoE, windows: dict[str, Tensor], expert_of: dict[str, int],
                     batch_size: int = 8) -> float | None:
    """Share of windows whose most-weighted expert (router weights averaged over the window's tokens and over
    layers) is their domain's expert; None for a mixture without routers (MoRA)."""
    layers = [m for layer in moe.layers.values() for m in layer.modules() if is_routed(m)]
    if not layers:
        return None
    model = moe.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0
    for domain, w in windows.items():
        for start in range(0, w.shape[0], batch_size):
            batch = w[start:start + batch_size].to(device)
            model(input_ids=batch)
            per_window = torch.stack([m.weights.view(batch.shape[0], -1, m.weights.shape[-1]).mean(1)
                                      for m in layers]).mean(0)  # [B, E]
            hits += int((per_window.argmax(-1) == expert_of[domain]).sum())
            total += batch.shape[0]
    model.train(was_training)
    return hits / total if total else None


AUX_WEIGHT = 0.01  # the rules' auxiliary losses' weight when training a mixture (lora mix, the lora_moe recipe)


def mix_checkpoint(model_path: str | os.PathLike, adapters: Sequence[str | os.PathLike], out: str | os.PathLike,
                   router: str = "topk", kind: str = "moe", domains: Sequence[str] | None = None, steps: int = 100,
                   train_experts: bool = False, aux_weight: float = AUX_WEIGHT, lr: float = 1e-3, batch_size: int = 8,
                   seq_len: int = 128, seed: int = 0, eval_windows: int = 16, progress: bool = True,
                   force: bool = False, **options) -> dict:
    """Build, train (when `domains` names one domain per adapter and steps > 0) and save a mixture; the summary
    has per-domain validation perplexity and routing accuracy when domains are given."""
    from moekit.compose.domains import domain_windows
    from moekit.compose.lora_moe import KINDS
    from moekit.compose.rules import RULES
    from moekit.errors import UnknownNameError

    if not adapters:
        raise ConfigError("--adapters: the adapter pool is empty; expected at least one PEFT LoRA adapter directory")
    if router not in RULES:
        raise UnknownNameError(f"--router {router!r} does not exist; expected one of {', '.join(RULES)}")
    if kind not in KINDS:
        raise UnknownNameError(f"--kind {kind!r} does not exist; expected one of {', '.join(KINDS)}")
    final = check_out_dir(out, [model_path, *adapters], force)
    if domains is not None and len(domains) != len(adapters):
        raise ConfigError(f"--domains: {len(domains)} domains for {len(adapters)} adapters; expected one domain per "
                          f"adapter, in the same order")
    if steps < 0:
        raise ConfigError(f"--steps {steps}: expected 0 or more")
    path, model, tokenizer = load_base(model_path)
    moe = LoraMoE.from_adapters(model, adapters, router=router, kind=kind, seed=seed, **options)
    summary: dict = {"model": str(path), "adapters": [str(a) for a in adapters], "kind": kind, "router": router,
                     "rule": moe.spec["rule"], "options": moe.spec["options"], "out": str(final),
                     "layers": len(moe.layers)}
    if domains is not None:
        if tokenizer is None:
            raise ConfigError(f"{path}: no tokenizer files; expected tokenizer.json to read the domains' text")
        expert_of = {d: i for i, d in enumerate(domains)}
        if steps > 0:
            per = max(1, steps * batch_size // len(domains))
            train = domain_windows(tokenizer, list(expert_of), "train", seq_len, max_windows=per, seed=seed)
            windows = torch.cat([train[d] for d in expert_of])
            labels = torch.cat([torch.full((train[d].shape[0],), expert_of[d]) for d in expert_of])
            params = moe.thaw(experts=train_experts)
            started = time.perf_counter()
            trained = fit(model, windows, params, steps, lr, batch_size, seed, aux=moe.aux_loss,
                          aux_weight=aux_weight, labels=labels, on_batch=moe.set_labels, progress=progress,
                          desc=f"lora mix {router}")
            summary.update(steps=steps, first_loss=trained["first_loss"], last_loss=trained["last_loss"],
                           seconds=round(time.perf_counter() - started, 3))
        valid = domain_windows(tokenizer, list(expert_of), "validation", seq_len, max_windows=eval_windows, seed=seed)
        summary["valid_ppl"] = evaluate_ppl(model, valid)
        summary["routing_accuracy"] = routing_accuracy(moe, valid, expert_of)
    moe.save(final, force)
    return summary
