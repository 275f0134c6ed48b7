"""MoTE on a trained transformers MoE checkpoint (`moekit compress MODEL --method mote`).

The checkpoint is already a mixture, so MoTE's upcycling step is done: what remains of the paper's recipe is its
training rule, ternary routed experts trained quantization-aware around full-precision parts. Per MoE block, on the
calibration tokens' block inputs x, the routed experts' latent weights W are trained so the block, with every
routed expert ternary, reproduces the full-precision block:

    min_W  mean_x || B(x; T(W)) - B(x; W0) ||^2,     T(w) = clamp(round(w / s), -1, 1) s per group (s = mean |w|),

straight-through (the forward pass uses T(W), the gradient reaches W). Router, attention and shared experts stay
full precision and fixed (DeepSeek-V3's and Qwen2-MoE's shared expert plays the paper's full-precision FFN). T is
computed exactly as moekit's ternary storage encodes (`qformat.encode`: float16 scales, padded groups averaged over
their real values), so after training `apply_quant(..., "ternary")` stores the very weights the training saw. W
starts at W0, so step 0 is post-training ternary (`--quant ternary`); the report gives both block errors.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moekit.compress.calibrate import Stats
from moekit.core.experts.qformat import QuantizedExperts, decode, encode
from moekit.core.experts.ragged import RaggedExperts
from moekit.errors import ConfigError
from moekit.hf.view import BlockView, view

DEFAULT_STEPS = 100
MAX_TOKENS = 4096  # calibration tokens per block the training reads (a seeded subsample beyond that)


def ternary_as_stored(w: Tensor, group_size: int) -> Tensor:
    """w [..., out, in] -> the dequantized ternary weights moekit's storage would hold (same shape, float32)."""
    rows = w.detach().float().reshape(-1, w.shape[-1])
    codes, scale = encode(rows, "ternary", group_size)
    return decode(codes, scale, "ternary", w.shape[-1], torch.float32).reshape(w.shape)


def _ste(w: Tensor, transposed: bool, group_size: int) -> Tensor:
    """Straight-through ternary of a fused [E, out, in] weight ([E, in, out] when transposed)."""
    oriented = w.transpose(1, 2) if transposed else w
    q = ternary_as_stored(oriented, group_size)
    q = q.transpose(1, 2) if transposed else q
    return w + (q.to(w.dtype) - w).detach()


def _block_out(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _check_block(block: BlockView) -> None:
    if isinstance(block.experts.module, (QuantizedExperts, RaggedExperts)):
        raise ConfigError(f"layer {block.layer}: --method mote expects full-width float experts; got "
                          f"{type(block.experts.module).__name__}")


def train_block(block: BlockView, x: Tensor, steps: int, lr: float, group_size: int) -> dict[str, float]:
    """Train `block`'s routed experts ternary-aware on block inputs x [T, H] (in place: the latent weights are
    written back into the model). Returns the block's mean squared error to its full-precision output with
    post-training ternary experts (`ptq_mse`) and after training (`mote_mse`)."""
    _check_block(block)
    name = block.family.experts
    work = copy.deepcopy(block.block).float().eval()  # the block in float32; the model's own is left alone
    for p in work.parameters():
        p.requires_grad_(False)
    experts = getattr(work, name)
    transposed = block.experts.transposed
    inp = x.float().unsqueeze(0)
    with torch.no_grad():
        target = _block_out(work(inp))
    latent = {k: getattr(experts, k).detach().clone().requires_grad_(True) for k in ("gate_up_proj", "down_proj")}
    scale = {k: float(v.detach().abs().mean()) for k, v in latent.items()}

    def loss() -> Tensor:
        subs = {f"{name}.{k}": _ste(v, transposed, group_size) for k, v in latent.items()}
        return (_block_out(torch.func.functional_call(work, subs, (inp,))) - target).square().mean()

    with torch.no_grad():
        ptq = float(loss())
    opt = torch.optim.Adam([{"params": [v], "lr": lr * scale[k]} for k, v in latent.items()])
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss().backward()
            opt.step()
    with torch.no_grad():
        after = float(loss())
        module = block.experts.module
        for k, v in latent.items():
            getattr(module, k).copy_(v.to(getattr(module, k).dtype))
    return {"ptq_mse": ptq, "mote_mse": after}


def mote(model: nn.Module, stats: Stats, steps: int = DEFAULT_STEPS, lr: float = 0.01, group_size: int = 64,
         progress: bool = True, seed: int = 0) -> dict:
    """Train every MoE block's routed experts of `model` ternary-aware (see the module docstring), then store them
    ternary (`apply_quant`). Returns {"steps", "lr", "group_size", "layers": {layer: {ptq_mse, mote_mse}},
    "quant_plan": the QuantPlan applied}."""
    from moekit.compress.quantize import apply_quant, plan_quant

    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"--steps {steps!r}: expected a non-negative number of training steps")
    if not lr > 0:
        raise ConfigError(f"lr={lr!r}: expected a positive learning rate")
    blocks = view(model)
    for b in blocks:
        _check_block(b)
    by_layer = {s.layer: s for s in stats.layers}
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for b in tqdm(blocks, desc="mote", unit="layer", disable=not progress, leave=False):
        x = by_layer[b.layer].x
        if len(x) > MAX_TOKENS:
            x = x[torch.randperm(len(x), generator=g)[:MAX_TOKENS]]
        layers[b.layer] = train_block(b, x, steps, lr, group_size)
    quant_plan = plan_quant(model, None, "ternary", group_size)
    apply_quant(model, quant_plan)
    return {"steps": steps, "lr": lr, "group_size": group_size, "layers": layers, "quant_plan": quant_plan}
