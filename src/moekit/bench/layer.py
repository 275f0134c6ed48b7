"""`moekit bench layer`: moekit's MoE layer against transformers' own blocks (eager and grouped_mm) holding the
same weights and against a dense SwiGLU FFN with the same active FLOPs, all timed interleaved in one process, in
float32 and in bfloat16 (every contender in the same dtype; bf16 GEMMs accumulate in float32 inside oneDNN, and
moekit combines the expert outputs in float32). Forward cases add moekit's layer with the same experts quantized to
int8 and to int4 (group 64, `moekit.core.experts.quantized`: packed CPU kernels where they run) and their speed-up
over the unquantized layer of the same dtype. Every record carries the machine (`timing.environment`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from moekit.bench.timing import environment, interleaved
from moekit.core.experts.qformat import QuantizedMatrix
from moekit.core.experts.quantized import DispatchedQuantizedExperts
from moekit.core.layer import MoE
from moekit.errors import ConfigError, UnknownNameError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LayerCase:
    name: str
    hidden: int
    intermediate: int
    experts: int
    k: int
    tokens: tuple[int, ...]
    shared: int = 0
    train: bool = False
    decode: bool = False

    def scaled(self, factor: int) -> LayerCase:
        """The same case with H, I and T divided by `factor` (for quick smoke runs)."""
        return LayerCase(self.name, max(self.hidden // factor, 16), max(self.intermediate // factor, 16), self.experts,
                         self.k, tuple(t if self.decode else max(t // factor, 8) for t in self.tokens), self.shared,
                         self.train, self.decode)


CASES = (
    LayerCase("prefill-8x2", 1024, 3584, 8, 2, (1024,)),
    LayerCase("fine-64x8", 1024, 512, 64, 8, (1024,), shared=2),
    LayerCase("decode-8x2", 1024, 3584, 8, 2, (1, 4), decode=True),
    LayerCase("train-8x2", 1024, 3584, 8, 2, (1024,), train=True),
)


class DenseSwiGLU(nn.Module):
    """A dense SwiGLU FFN with the gate and up projections fused into one GEMM, as the MoE experts are."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _moekit_layer(case: LayerCase, dtype: torch.dtype = torch.float32) -> MoE:
    if case.shared:  # DeepSeek-V2 routing (softmax, greedy top-k, no renormalisation) with shared experts
        return MoE(case.hidden, case.intermediate, case.experts, case.k, router="deepseek_v2",
                   num_shared_experts=case.shared, dtype=dtype)
    return MoE(case.hidden, case.intermediate, case.experts, case.k, router="topk", dtype=dtype)


QUANT_FORMATS = ("int8", "int4")
QUANT_GROUP = 64


def _quantized_layer(moe: MoE, fmt: str) -> MoE:
    """`moe` with the same router and its routed experts quantized to `fmt` (a shallow copy: nothing else copied)."""
    e = moe.experts
    q = DispatchedQuantizedExperts([fmt] * e.num_experts, QUANT_GROUP, e.hidden_size, e.intermediate_size,
                                   act_fn=nn.SiLU(), dtype=e.gate_up_proj.dtype, device="meta")
    with torch.no_grad():
        for i in range(e.num_experts):
            q.gate_up_q[i] = QuantizedMatrix.from_float(e.up_weight(i), fmt, QUANT_GROUP)
            q.down_q[i] = QuantizedMatrix.from_float(e.down_weight(i), fmt, QUANT_GROUP)
    layer = copy.copy(moe)
    layer._modules = dict(moe._modules)
    layer._modules["experts"] = q
    return layer


def _transformers_block(case: LayerCase, moe: MoE, impl: str) -> nn.Module:
    """transformers' block of the matching family, holding moekit's parameters (shared, not copied)."""
    if case.shared:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

        config = DeepseekV2Config(hidden_size=case.hidden, moe_intermediate_size=case.intermediate,
                                  n_routed_experts=case.experts, num_experts_per_tok=case.k,
                                  n_shared_experts=case.shared, topk_method="greedy", routed_scaling_factor=1.0)
        block = DeepseekV2Moe(config)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.shared_experts, name).weight = getattr(moe.shared_experts, name).weight
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=case.hidden, intermediate_size=case.intermediate,
                               num_local_experts=case.experts, num_experts_per_tok=case.k)
        block = MixtralSparseMoeBlock(config)
    block.experts.config = copy.copy(block.experts.config)
    block.experts.config._experts_implementation = impl
    block.gate.weight = moe.router.weight
    block.experts.gate_up_proj = moe.experts.gate_up_proj
    block.experts.down_proj = moe.experts.down_proj
    return block.to(moe.experts.gate_up_proj.dtype)  # its remaining tensors; the shared ones already are


def _runner(module: nn.Module, x: Tensor, grad: Tensor | None, moekit: bool) -> Callable[[], object]:
    def output() -> Tensor:
        out = module(x)
        return out.hidden if moekit else out

    if grad is None:
        def infer() -> object:
            with torch.no_grad():
                return output()
        return infer

    def train_step() -> object:
        module.zero_grad(set_to_none=True)
        x.grad = None
        output().backward(grad)
        return None
    return train_step


def _bytes_read(moe: MoE, x: Tensor) -> int:
    """Weights a forward over x must read at least once: the router and every expert some token chose."""
    with torch.no_grad():
        routing = moe.router(x.reshape(-1, moe.hidden_size))
    active = int(torch.unique(routing.indices).numel())
    return active * moe.experts.bytes_per_expert() + moe.router.weight.numel() * moe.router.weight.element_size()


def run_case(case: LayerCase, repeats: int, copy_bytes: int | None = None, dtype: str = "fp32") -> list[dict]:
    """Time every contender on `case` in `dtype` (fp32 or bf16), interleaved. With `copy_bytes` (decode cases), a
    copy of that many bytes is timed in the same rounds and gives the memory bandwidth for `floor_ms`."""
    torch.manual_seed(0)
    torch_dtype = DTYPES[dtype]
    moe = _moekit_layer(case, torch_dtype)
    contenders: dict[str, nn.Module] = {
        "moekit": moe,
        "transformers_eager": _transformers_block(case, moe, "eager"),
        "transformers_grouped_mm": _transformers_block(case, moe, "grouped_mm"),
        "dense": DenseSwiGLU(case.hidden, (case.k + case.shared) * case.intermediate).to(torch_dtype),
    }
    quantized = [] if case.train else [f"moekit_{fmt}" for fmt in QUANT_FORMATS]
    for name in quantized:
        contenders[name] = _quantized_layer(moe, name.removeprefix("moekit_"))
    records = []
    for tokens in case.tokens:
        x = torch.randn(1, tokens, case.hidden, dtype=torch_dtype, requires_grad=case.train)
        grad = torch.randn(1, tokens, case.hidden, dtype=torch_dtype) if case.train else None
        fns = {name: _runner(m, x, grad, name.startswith("moekit")) for name, m in contenders.items()}
        evict = None
        if copy_bytes:
            src = torch.ones(copy_bytes // 4)
            dst = torch.empty_like(src)
            fns["copy"] = lambda src=src, dst=dst: dst.copy_(src)
            # a decode step finds this layer's weights in memory, not in cache (the other layers ran in between)
            evict = lambda src=src, dst=dst: dst.copy_(src)  # noqa: E731
        ms = interleaved(fns, repeats, before=evict)
        copy_ms = ms.pop("copy", None)
        rec = {"case": case.name, "tokens": tokens, "hidden": case.hidden, "intermediate": case.intermediate,
               "experts": case.experts, "k": case.k, "shared": case.shared, "dtype": dtype,
               "mode": "train" if case.train else "forward", "repeats": repeats,
               **{f"{name}_ms": round(v, 4) for name, v in ms.items()}, "floor_ms": None}
        if copy_ms:
            bandwidth = 2 * copy_bytes / (copy_ms / 1e3)  # bytes read + bytes written per second
            rec["memory_bandwidth_gbs"] = round(bandwidth / 1e9, 2)
            rec["bytes_read"] = _bytes_read(moe, x)
            rec["floor_ms"] = round(rec["bytes_read"] / bandwidth * 1e3, 4)
        rec["dense_over_moekit"] = round(ms["dense"] / ms["moekit"], 3)
        rec["transformers_eager_over_moekit"] = round(ms["transformers_eager"] / ms["moekit"], 3)
        rec["transformers_grouped_mm_over_moekit"] = round(ms["transformers_grouped_mm"] / ms["moekit"], 3)
        rec["moekit_over_floor"] = round(ms["moekit"] / rec["floor_ms"], 3) if rec["floor_ms"] else None
        for name in quantized:  # above 1: the quantized experts are faster than the same experts unquantized
            rec[f"moekit_over_{name}"] = round(ms["moekit"] / ms[name], 3)
        records.append(rec | environment())
    return records


def bench_layer(cases: list[str] | None = None, repeats: int = 10, quick: bool = False,
                dtypes: list[str] | None = None) -> list[dict]:
    """Run the layer benchmark in each of `dtypes` (default: fp32 and bf16); `quick` shrinks every case 16x (a smoke
    run, not a measurement)."""
    known = {c.name: c for c in CASES}
    names = cases or list(known)
    for n in names:
        if n not in known:
            raise UnknownNameError(f"case={n!r}: expected one of {', '.join(known)}")
    dtypes = dtypes or list(DTYPES)
    for d in dtypes:
        if d not in DTYPES:
            raise ConfigError(f"--dtype={d!r}: expected one of {', '.join(DTYPES)}")
    selected = [(known[n].scaled(16) if quick else known[n], d) for n in names for d in dtypes]
    records: list[dict] = []
    for case, dtype in tqdm(selected, desc="bench layer", unit="case"):
        records.extend(run_case(case, repeats, (16 if quick else 256) * 2**20 if case.decode else None, dtype))
    return records
