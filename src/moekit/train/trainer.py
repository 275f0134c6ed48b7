"""A compact trainer for causal LMs whose MLPs are MoE layers (a transformers MoE family, run through moekit's
dispatch): AdamW, warmup + cosine, gradient accumulation, clipping, balance and z losses logged apart, expert load
and router entropy per layer, metrics as JSON lines, safetensors checkpoints, and a resume that continues bit for
bit (the batch of step s depends only on the seed and s; model, optimizer and schedule state are restored).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from moekit.core.losses import update_correction_bias, z_loss
from moekit.errors import ConfigError, UnknownNameError
from moekit.files import atomic_write, check_output
from moekit.train.balance import LoadRecorder, correction_biases, load_stats, sequence_balance_loss, update_biases
from moekit.train.checkpointing import check_out_dir, clear_run, read_checkpoint, write_checkpoint, write_run_model
from moekit.train.corpus import build_corpus
from moekit.train.moe_model import MoEBlock, moe_blocks, use_moekit_layers
from moekit.train.parallel import Runtime, average_gradients, clip_gradients, init_runtime, shard_experts
from moekit.train.tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer
from moekit.train.validate import check_recipe


@dataclass(frozen=True)
class Recipe:
    """Everything a run depends on. model: transformers config keywords (with `model_type`)."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    grad_accum: int = 1
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    balance_coef: float = 0.01
    z_coef: float = 1e-3
    max_docs_per_domain: int | None = None
    prose_dir: str | None = None  # None: python3.11-doc's sources if installed, else pydoc_data
    code_dir: str | None = None  # None: Python's standard library
    save_every: int = 0
    seed: int = 0
    data_seed: int | None = None  # the corpus's split and document selection (None: `seed`)
    # moekit.MoE keyword arguments (router, router_options, ...): the model's MoE blocks become moekit layers
    moe_layer: dict[str, Any] | None = None
    bias_update_rate: float = 0.0  # DeepSeek-V3 auxiliary-loss-free balancing step per training step (0: off)
    seq_balance_coef: float = 0.0  # DeepSeek-V3's sequence-wise balance loss weight (native families; 0: off)
    dtype: str = "fp32"  # "bf16": forward and backward under bf16 autocast, fp32 master weights and optimizer
    # a checkpoint directory to start from instead of building `model` and training a tokenizer (moekit.train.init_from)
    init_from: str | None = None
    # a LoRA-MoE over saved PEFT adapters on the init_from model, only its routers trained (moekit.train.init_from)
    lora_moe: dict[str, Any] | None = None


# moekit-tiny v1 (the default until v2): Qwen3-MoE, 8 experts of width 384, top-2, 2.9M tokens
_TINY_V1 = dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=768, moe_intermediate_size=384,
                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                tie_word_embeddings=True)
# the dense model with the same active FLOPs per token: one MLP as wide as the two chosen experts together
_TINY_V1_DENSE = {**{k: v for k, v in _TINY_V1.items() if k not in ("moe_intermediate_size", "num_experts",
                                                                   "num_experts_per_tok", "norm_topk_prob")},
                  "model_type": "qwen3", "intermediate_size": 2 * 384}
# moekit-tiny v2: DeepSeek-V3 (multi-head latent attention, sigmoid routing with the balancing bias, one shared
# expert, routed_scaling_factor), fine-grained: 64 routed experts of width 64 in every layer, 6 routed per token
_TINY_MODEL = dict(model_type="deepseek_v3", hidden_size=256, moe_intermediate_size=64, n_routed_experts=64,
                   num_experts_per_tok=6, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0,
                   routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16,
                   qk_nope_head_dim=48, v_head_dim=64, intermediate_size=7 * 64, max_position_embeddings=256,
                   tie_word_embeddings=True)  # the context it is trained at (seq_len): beyond it, perplexity x7
# its dense twin: the same DeepSeek-V3 network with every layer dense, the MLP as wide as the 6 routed experts and
# the shared one together (equal active FLOPs per token, the router aside)
_TINY_DENSE = {**_TINY_MODEL, "first_k_dense_replace": _TINY_MODEL["num_hidden_layers"]}
_TINY_RUN = dict(vocab_size=4096, seq_len=256, batch_size=16, steps=5000, warmup=200, lr=2e-3, save_every=250,
                 dtype="bf16", z_coef=0.0, balance_coef=0.0)

RECIPES: dict[str, Recipe] = {
    # 5,000 steps of 16 x 256 tokens = 20.5M tokens; balanced by the DeepSeek-V3 bias alone plus its small
    # sequence-wise balance loss (no Switch loss, no z-loss)
    "tiny": Recipe("tiny", _TINY_MODEL, **_TINY_RUN, bias_update_rate=5e-3, seq_balance_coef=1e-4),
    "tiny-dense": Recipe("tiny-dense", _TINY_DENSE, **_TINY_RUN),
    "tiny-v1": Recipe("tiny-v1", _TINY_V1, vocab_size=4096, seq_len=256, batch_size=16, steps=700, warmup=60,
                      save_every=100),
    "tiny-v1-dense": Recipe("tiny-v1-dense", _TINY_V1_DENSE, vocab_size=4096, seq_len=256, batch_size=16, steps=700,
                            warmup=60, save_every=100, balance_coef=0.0, z_coef=0.0),
    "smoke": Recipe("smoke", {**_TINY_V1, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                              "num_experts": 4, "num_hidden_layers": 2, "head_dim": 8, "max_position_embeddings": 64},
                    vocab_size=300, seq_len=32, batch_size=4, steps=6, warmup=2, grad_accum=2, max_docs_per_domain=20),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UnknownNameError(f"recipe={name!r}: expected one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warmup to `lr`, then cosine down to `lr * min_lr_ratio` at the last step (step counts from 0)."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def corpus_seed(recipe: Recipe) -> int:
    """The seed of the corpus's split and document selection: `data_seed`, else `seed`."""
    return recipe.seed if recipe.data_seed is None else recipe.data_seed


def batch_at(tokens: Tensor, recipe: Recipe, step: int, micro: int) -> Tensor:
    """[batch_size, seq_len] windows of the token stream (or of token labels aligned with it), chosen by (seed, step,
    micro) alone."""
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step * 997 + micro)
    starts = torch.randint(0, tokens.numel() - recipe.seq_len, (recipe.batch_size,), generator=g)
    return torch.stack([tokens[s:s + recipe.seq_len] for s in starts.tolist()])


def router_stats(router_logits: tuple[Tensor, ...]) -> tuple[Tensor, list[float]]:
    """z-loss over all layers, and per layer the mean router entropy (of the softmax over the logits). The load
    itself is counted from the real selections (`LoadRecorder`)."""
    z, entropies = [], []
    for logits in router_logits:
        logits = logits.float()
        z.append(z_loss(logits))
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            entropies.append(float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()))
    return torch.stack(z).mean(), entropies


def bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def model_type_is_moe(config: Any) -> bool:
    """Whether a transformers config is of a supported MoE family and has at least one MoE layer."""
    import moekit.hf as mh

    family = mh.FAMILIES.get(getattr(config, "model_type", None))
    return family is not None and bool(family.moe_layers(config))


def _build_model(recipe: Recipe, vocab_size: int, rt: Runtime | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    import moekit.hf as mh

    kw = dict(recipe.model)
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(model_type, **kw, vocab_size=vocab_size)
    # an MoE family configured with no MoE layer (e.g. DeepSeek-V3 with every layer dense) trains as a dense model
    moe = model_type_is_moe(config)
    if recipe.moe_layer is not None and not moe:
        raise ConfigError(f"recipe {recipe.name!r}: moe_layer needs an MoE model_type; got {model_type!r}")
    if rt is not None and rt.world > 1 and recipe.moe_layer is None:
        raise ConfigError(f"recipe {recipe.name!r}: expert parallelism runs moekit layers; expected moe_layer to be "
                          "set (e.g. --set 'moe_layer={}')")
    if moe and recipe.moe_layer is None:
        config = AutoConfig.for_model(model_type, **kw, output_router_logits=True,
                                      router_aux_loss_coef=recipe.balance_coef, vocab_size=vocab_size)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config)
    if recipe.moe_layer is not None:
        blocks = use_moekit_layers(model, recipe.moe_layer, recipe.balance_coef, recipe.z_coef)
        if recipe.bias_update_rate and not all(hasattr(b.moe.router, "e_score_correction_bias") for b in blocks):
            raise ConfigError(f"recipe {recipe.name!r}: bias_update_rate needs a router with e_score_correction_bias;"
                              " expected moe_layer router 'deepseek_v3'")
        if rt is not None and rt.world > 1:
            shard_experts(model)
        return model
    return mh.accelerate(model) if moe else model


def _moekit_step_stats(blocks: list[MoEBlock], rt: Runtime) -> tuple[Tensor, dict[str, Tensor], list[Tensor],
                                                                        list[float], list[float]]:
    """Layer-mean aux loss (weighted, differentiable), layer-mean unweighted losses by name, and per layer the
    global expert counts, router entropy and mean experts per token."""
    outs = [b.last for b in blocks]
    aux = torch.stack([o.aux_loss for o in outs]).mean()
    losses = {name: torch.stack([o.losses[name] for o in outs]).mean().detach() for name in outs[0].losses}
    counts, entropies, per_token = [], [], []
    with torch.no_grad():
        for o in outs:
            counts.append(rt.all_reduce(o.routing.counts().to(torch.float64)))
            probs = o.routing.probs if o.routing.probs is not None else torch.softmax(o.routing.logits.float(), -1)
            entropies.append(float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()))
            per_token.append(float(o.routing.experts_per_token().float().mean()))
    return aux, losses, counts, entropies, per_token


def _step_hooks(blocks: list[MoEBlock], step: int, total: int) -> None:
    """Routers with a schedule (e.g. SMoE-Dropout's growing k) get `set_step(step, total)` before each step."""
    for b in blocks:
        for owner in (b.moe, b.moe.router):
            hook = getattr(owner, "set_step", None)
            if hook is not None:
                hook(step, total)
                break


def train(recipe: Recipe | str, out_dir: str | os.PathLike[str], resume: bool = False, stop_at: int | None = None,
          progress: bool = True, init: Callable[[nn.Module], None] | None = None, force: bool = False,
          **overrides: Any) -> list[dict]:
    """Train `recipe` into out_dir (metrics.jsonl, tokenizer/, checkpoint/, model/ at the end). `stop_at` ends
    early at that step (the schedule still follows `recipe.steps`). `init(model)`, if given, runs on the freshly
    built model before the first step of a new run. `force` starts again in a training directory that holds a
    run (finished, interrupted or failed). Under torchrun (WORLD_SIZE > 1) the experts are sharded over the ranks
    and each rank trains on its slice of every batch; only rank 0 writes. Returns this call's metrics."""
    import moekit.hf as mh
    import moekit.train.init_from as fc

    recipe = replace(get_recipe(recipe) if isinstance(recipe, str) else recipe, **overrides)
    check_recipe(recipe, stop_at)
    rt = init_runtime()
    if recipe.batch_size % rt.world:
        raise ConfigError(f"batch_size={recipe.batch_size}: expected a multiple of the {rt.world} ranks")
    out = check_output(out_dir, (recipe.prose_dir, recipe.code_dir, recipe.init_from))
    start = check_out_dir(out, recipe, resume, force)
    if recipe.init_from is None:
        corpus = build_corpus(recipe.prose_dir, recipe.code_dir, recipe.max_docs_per_domain, corpus_seed(recipe))
        texts, doc_labels = corpus.texts("train"), None
    else:
        texts, doc_labels = fc.train_texts(recipe, corpus_seed(recipe))
    rt.barrier()  # every rank has checked the directory before rank 0 fills it
    if rt.main:
        if force:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if not resume and recipe.init_from is not None:
            fc.copy_tokenizer(recipe.init_from, out / "tokenizer")
        elif not resume:
            tok = train_tokenizer(corpus, vocab_size=recipe.vocab_size)
            save_tokenizer(tok, out / "tokenizer", model_max_length=recipe.seq_len)
    rt.barrier()
    tok = load_tokenizer(out / "tokenizer")
    eos = tok.token_to_id(EOS_TOKEN) if recipe.init_from is None else fc.eos_id(tok, recipe.init_from)
    tokens, token_labels = fc.token_stream(tok, eos, texts, doc_labels)
    if tokens.numel() <= recipe.seq_len:
        raise ConfigError(f"corpus train split: {tokens.numel()} tokens; expected more than seq_len={recipe.seq_len}")

    model = _build_model(recipe, tok.get_vocab_size(), rt) if recipe.init_from is None else fc.load_model(recipe, rt)
    mixture = fc.attach_lora_moe(model, recipe) if recipe.lora_moe is not None else None
    if init is not None and not resume:
        init(model)
    blocks = moe_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad] if mixture is not None else model.parameters()
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if resume:
        read_checkpoint(out, model, opt, rt)
    hf_moe = not blocks and mixture is None and model_type_is_moe(model.config)
    recorder = LoadRecorder(model, keep_routing=recipe.seq_balance_coef > 0) if hf_moe else None
    biases = correction_biases(model) if hf_moe and recipe.bias_update_rate else []
    sigmoid = hf_moe and recorder.blocks[0].family.routing.startswith("sigmoid")
    bf16 = recipe.dtype == "bf16"
    if bf16 and not bf16_native():
        warnings.warn("dtype=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); training runs emulated bf16",
                      stacklevel=2)
    metrics_path = out / "metrics.jsonl"
    if rt.main:
        atomic_write(metrics_path, "".join(line + "\n" for line in _metrics_before(metrics_path, start)
                                           if resume))
    end = min(recipe.steps, stop_at or recipe.steps)
    records = []
    model.train()
    for step in tqdm(range(start, end), desc=f"train {recipe.name}", unit="step", disable=not (progress and rt.main),
                     initial=start, total=end):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step)
        _step_hooks(blocks, step, recipe.steps)
        sums: dict[str, float] = {"loss": 0.0, "lm_loss": 0.0, "balance": 0.0, "z": 0.0}
        step_counts: list[Tensor] = []
        extra: dict[str, list[float]] = {}
        if recorder is not None:
            recorder.reset()
        for micro in range(recipe.grad_accum):
            batch = batch_at(tokens, recipe, step, micro).chunk(rt.world)[rt.rank]
            for b in blocks:
                b.token_ids = batch
            if token_labels is not None:
                mixture.set_labels(batch_at(token_labels, recipe, step, micro).chunk(rt.world)[rt.rank])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out_ = model(input_ids=batch, labels=batch)
            if blocks:
                aux, losses, counts, entropies, per_token = _moekit_step_stats(blocks, rt)
                loss, lm_loss = out_.loss + aux, out_.loss
                balance, z = losses.get("balance", torch.zeros(())), losses.get("z", torch.zeros(()))
                step_counts = counts if not step_counts else [a + c for a, c in zip(step_counts, counts, strict=True)]
                cvs = [float(c.std(unbiased=False) / c.mean().clamp_min(1e-12)) for c in counts]
                extra = {"experts_per_token": per_token,
                         **{f"aux_{n}": [float(v)] for n, v in losses.items() if n not in ("balance", "z")}}
            elif hf_moe:
                z, entropies = router_stats(out_.router_logits)
                balance = out_.aux_loss if out_.aux_loss is not None else torch.zeros(())
                loss = out_.loss + recipe.z_coef * z  # out_.loss already holds balance_coef * aux_loss
                lm_loss = out_.loss - recipe.balance_coef * balance
                if recipe.seq_balance_coef:
                    seq = sequence_balance_loss(recorder, batch.shape[1], sigmoid)
                    loss = loss + recipe.seq_balance_coef * seq
                    extra.setdefault("seq_balance", [0.0])[0] += float(seq.detach()) / recipe.grad_accum
            else:
                z = balance = torch.zeros(())
                cvs, entropies = [], []
                loss = lm_loss = out_.loss
                if mixture is not None:
                    aux, named = fc.mixture_losses(mixture, recipe.lora_moe)
                    loss = lm_loss + aux
                    for n, v in named.items():  # each summed over the layers, averaged over the micro-batches
                        extra.setdefault(f"aux_{n}", [0.0])[0] += v / recipe.grad_accum
            if not torch.isfinite(loss):
                raise ConfigError(f"step {step + 1}: the loss is {float(loss)}; the run diverged (lr={recipe.lr}, "
                                  f"clip={recipe.clip}); expected finite losses (lower lr; --resume restarts from "
                                  "the last checkpoint, --force from the start)")
            (loss / recipe.grad_accum).backward()
            for name, value in (("loss", loss), ("lm_loss", lm_loss), ("balance", balance), ("z", z)):
                sums[name] += value.item() / recipe.grad_accum
        average_gradients(model, rt)
        grad_norm = clip_gradients(model, recipe.clip, rt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if recorder is not None:
            stats = load_stats(recorder.counts)
            cvs = stats.pop("load_cv")
            extra.update(stats)
            if biases:
                extra["bias_spread"] = update_biases(biases, recorder.counts, recipe.bias_update_rate)
        elif recipe.bias_update_rate:
            spread = []
            for b, counts in zip(blocks, step_counts, strict=True):
                bias = update_correction_bias(b.moe.router.e_score_correction_bias, counts, recipe.bias_update_rate)
                spread.append(float(bias.max() - bias.min()))
            extra["bias_spread"] = spread  # how far apart the balancing biases have moved, per layer
        if rt.world > 1:  # the logged losses are the global batch's
            sums = {n: float(rt.all_reduce(torch.tensor(v, dtype=torch.float64))) / rt.world for n, v in sums.items()}
        seconds = time.perf_counter() - t0
        rec = {"step": step + 1, "lr": lr_at(recipe, step), **{n: round(v, 6) for n, v in sums.items()},
               "grad_norm": round(grad_norm, 4), "load_cv": [round(c, 4) for c in cvs],
               "router_entropy": [round(e, 4) for e in entropies],
               **{n: [round(x, 4) for x in v] for n, v in extra.items()},
               "tokens_per_s": round(recipe.batch_size * recipe.seq_len * recipe.grad_accum / seconds, 1)}
        records.append(rec)
        if rt.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if recipe.save_every and (step + 1) % recipe.save_every == 0:
            write_checkpoint(out, model, opt, recipe, step + 1, rt)
    write_checkpoint(out, model, opt, recipe, end, rt)
    if end == recipe.steps:
        if mixture is not None and rt.main:
            fc.save_mixture(mixture, recipe, out / "model")
        elif blocks:
            write_run_model(out / "model", model, recipe, tok.get_vocab_size(), rt)
        elif rt.main and hf_moe:
            mh.restore(model)
            mh.save(model.eval(), out / "model", force=True)
        elif rt.main:
            model.eval().save_pretrained(out / "model")
    return records


def _metrics_before(path: Path, start: int) -> list[str]:
    """The metrics lines of steps <= start (a resumed run rewrites the rest); unreadable lines are dropped."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(step, int) and step <= start:
            kept.append(line)
    return kept


def load_run(run_dir: str | os.PathLike[str]) -> nn.Module:
    """The trained model of a finished run (`run_dir` or its `model/`), in eval mode on one process: a native
    transformers model (MoE or dense), the recipe's model with moekit layers for runs with `moe_layer`, or the
    init_from model with the trained LoRA-MoE attached for runs with `lora_moe`."""
    path = Path(run_dir)
    path = path / "model" if (path / "model").is_dir() else path
    if (path / "mixture.json").exists():
        from moekit.train.init_from import load_mixture_run

        return load_mixture_run(path)
    if (path / "run.json").exists():
        saved = json.loads((path / "run.json").read_text())
        recipe = Recipe(**saved["recipe"])
        model = _build_model(recipe, saved["vocab_size"])
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if missing or unexpected:
            raise ConfigError(f"{path / 'model.safetensors'}: does not match run.json's recipe (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
        return model.eval()
    if (path / "config.json").exists():
        from transformers import AutoConfig, AutoModelForCausalLM

        import moekit.hf as mh

        if model_type_is_moe(AutoConfig.from_pretrained(path)):
            return mh.load(path).eval()
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()  # a dense run
    raise ConfigError(f"{path}: expected a finished run directory (model/run.json or model/config.json)")
