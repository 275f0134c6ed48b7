"""A bridged model whose routed experts live in the checkpoint's files, read on demand through an `ExpertStore`.

`load_offloaded(path, expert_memory)` builds the family's model without initialising it, loads every tensor that
is not a routed expert's matrix (attention, norms, embeddings, routers, shared experts, expert biases) and leaves
the experts on disk. Each MoE layer's experts module then runs as `OffloadedExperts`, one more expert storage format
keeping the `ExpertsLike` contract: dispatch's `loop` path calls `expert(x, e)`, which takes expert e's tensors from
the store and computes exactly as the stored format does (dense fused, ragged widths, or quantized codes: the
quantized module's own `run_expert` with the expert's codes swapped in for the call).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.core.dispatch import dispatch, plan_assignments
from moekit.core.experts import Experts, RaggedExperts
from moekit.core.experts.qformat import QuantizedExperts
from moekit.core.experts.ragged import glu
from moekit.errors import ConfigError
from moekit.hf.families import family_of
from moekit.hf.view import view
from moekit.runtime.layout import checkpoint_layout, expert_parts, main_dtype
from moekit.runtime.policies import make_policy
from moekit.runtime.store import (
    ExpertStore,
    PreadReader,
    StoreError,
    whole_part,
)

_RENAMES = ((".block_sparse_moe.gate.", ".mlp.gate."), (".block_sparse_moe.gate.", ".mlp.router."),
            (".router.layer.", ".router."))


class _Slot:
    """One dense expert as `Experts.expert` reads it (index 0)."""

    def __init__(self, gate_up: Tensor, down: Tensor, up_bias: Tensor | None, down_bias: Tensor | None, act,
                 transposed: bool):
        self.gate_up_proj, self.down_proj = gate_up.unsqueeze(0), down.unsqueeze(0)
        self.gate_up_proj_bias = None if up_bias is None else up_bias.unsqueeze(0)
        self.down_proj_bias = None if down_bias is None else down_bias.unsqueeze(0)
        self.act, self.transposed = act, transposed

    up_weight = Experts.up_weight
    down_weight = Experts.down_weight
    expert = Experts.expert


class OffloadedExperts:  # implements moekit.core.experts.ExpertsLike (the loop path)
    """A layer's experts read from `store` as needed. `kind`: dense, ragged or quantized (the checkpoint's format);
    `module`: the model's experts module, holding the resident parts (biases, activation, widths, formats)."""

    format = "offloaded"

    def __init__(self, layer: int, kind: str, module: nn.Module, hf_experts, store: ExpertStore,
                 num_experts: int, hidden: int, width: int, dtype: torch.dtype):
        self.layer, self.kind, self.module, self.store = layer, kind, module, store
        self.hf = hf_experts
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, width
        self.transposed = getattr(hf_experts, "transposed", False)
        self.gate_up_proj = torch.empty(0, dtype=dtype, device="meta")  # dispatch reads its dtype only
        self.down_proj = self.gate_up_proj
        self.gate_up_proj_bias = self.down_proj_bias = None
        self.act = getattr(hf_experts, "act", None)
        self.prefetcher = None  # set by moekit.runtime.prefetch

    def bytes_per_expert(self) -> int:
        return self.store.slot_bytes

    def expert(self, x: Tensor, e: int) -> Tensor:
        parts = self.store.get(self.layer, e)
        m = self.module
        if self.kind == "dense":
            up_b = getattr(m, "gate_up_proj_bias", None)
            down_b = getattr(m, "down_proj_bias", None)
            slot = _Slot(parts["gate_up"], parts["down"], None if up_b is None else up_b[e],
                         None if down_b is None else down_b[e], self.act, self.transposed)
            return slot.expert(x, 0)
        if self.kind == "ragged":
            w = m.widths[e]
            o = m.offsets[e]
            bias = None if m.gate_up_bias_packed is None else m.gate_up_bias_packed[2 * o: 2 * o + 2 * w]
            h = nn.functional.linear(x, parts["gate_up"], bias)
            down_b = None if m.down_proj_bias is None else m.down_proj_bias[e]
            return nn.functional.linear(glu(h[:, :w], h[:, w:], m.act_fn, m.gpt_oss), parts["down"], down_b)
        saved = []
        for name in ("gate_up", "down"):
            qm = getattr(m, f"{name}_q")[e]
            for buf in ("codes", "scale"):
                if f"{name}.{buf}" in parts:
                    saved.append((qm, buf, qm._buffers[buf]))
                    qm._buffers[buf] = parts[f"{name}.{buf}"]
        try:  # the module's own ExpertsLike path (its packed kernels where it has them), as the resident model
            return m.expert(x, e) if hasattr(m, "expert") else m.run_expert(x, e)
        finally:
            for qm, buf, old in saved:
                qm._buffers[buf] = old
            kernels = getattr(m, "_kernels", None)  # per-expert packed weights: built from this call's codes only
            if isinstance(kernels, dict):
                for key in [k for k in kernels if k[0] == e]:
                    del kernels[key]

    def __call__(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The experts module's forward: hidden [T, H], top_k_index / top_k_weights [T, k] -> [T, H]."""
        valid = (top_k_index >= 0) & (top_k_index < self.num_experts)
        if self.kind == "quantized":
            valid &= top_k_weights != 0
        chosen = torch.unique(top_k_index[valid]).tolist()
        self.store.begin_layer(self.layer, chosen)
        if self.prefetcher is not None:
            self.prefetcher.after_gate(self.layer, hidden, chosen)
        if self.kind == "ragged":  # RaggedExperts.forward's own order (its rows and sums), so results are equal
            out = torch.zeros_like(hidden)
            for e in chosen:
                token, slot = torch.where(top_k_index == e)
                y = self.expert(hidden[token], e) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
            return out
        plan = plan_assignments(top_k_index, top_k_weights, self.num_experts,
                                mask=None if bool(valid.all()) else valid)
        return dispatch(hidden, plan, self, "loop")


@dataclass
class Offloaded:
    """What `load_offloaded` returns. `store` is None when every expert fits the budget (loaded resident)."""

    model: nn.Module
    store: ExpertStore | None
    experts: dict[int, OffloadedExperts]
    expert_bytes: int  # all routed experts' bytes
    resident_bytes: int  # everything else, loaded in memory
    note: str

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def parse_memory(spec: str | int | float, total: int) -> int:
    """`expert_memory` as bytes: an int (bytes), '2GB' / '512MiB' / '300M' / '1e9', or '25%' of all experts."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = int(spec)
    else:
        text = str(spec).strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*(%|[kKmMgGtT]i?[bB]?|[bB])?", text)
        if m is None:
            raise ConfigError(f"expert memory {spec!r}: expected bytes, a size like 2GB or 512MiB, or a percentage "
                              "like 25%")
        number, unit = float(m.group(1)), (m.group(2) or "").upper()
        if unit == "%":
            if not 0 < number <= 100:
                raise ConfigError(f"expert memory {spec!r}: expected a percentage in (0, 100]")
            value = int(total * number / 100)
        else:
            base = 1024 if "I" in unit else 1000
            power = "BKMGT".index(unit[0]) if unit else 0
            value = int(number * base ** power)
    if value < 1:
        raise ConfigError(f"expert memory {spec!r}: expected a positive amount")
    return value


def _build(directory: Path, config, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    family = family_of(config, source=str(directory / "config.json"))
    if getattr(config, "quantization_config", None):
        raise ConfigError(f"{directory}: quantization_config {config.quantization_config.get('quant_method')!r}: "
                          "offloading reads float, moekit-quantized or ragged experts only")
    with no_init_weights():
        if (directory / "moekit.json").exists():
            from moekit.hf.manifest import build_manifest_model, read_manifest

            config.auto_map = {}
            model = build_manifest_model(config, read_manifest(directory), family, dtype, directory / "moekit.json")
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), family


def _kind(module: nn.Module) -> str:
    if isinstance(module, QuantizedExperts):
        return "quantized"
    if isinstance(module, RaggedExperts):
        return "ragged"
    if isinstance(getattr(module, "down_proj", None), nn.Parameter):
        return "dense"
    raise ConfigError(f"{type(module).__name__}: this expert format is not offloaded (dense, ragged and quantized "
                      "experts are)")


def _expert_matrices(module: nn.Module, kind: str) -> list[str]:
    """The in-memory names (relative to the experts module) of the tensors the store holds."""
    if kind == "dense":
        return ["gate_up_proj", "down_proj"]
    if kind == "ragged":
        return ["gate_up_packed", "down_packed"]
    return [n for n, _ in module.named_buffers() if n.startswith(("gate_up_q.", "down_q."))]


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load_offloaded(path: str | Path, expert_memory: str | int | float = "25%", policy: str = "lru", *,
                   dtype: torch.dtype | None = None, reader: PreadReader | None = None, workers: int = 2) -> Offloaded:
    """The model at `path` (a local checkpoint directory) with its routed experts read on demand, at most
    `expert_memory` of them cached (bytes, '2GB', '25%' of all experts' bytes) under cache `policy`
    (`moekit.runtime.policies.POLICIES`, except belady: trace replay only). A budget at least the experts' total
    loads the model fully resident (with `moekit.hf.load`) and says so in `note`."""
    from transformers import AutoConfig

    from moekit.hf.validate import check_checkpoint

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise StoreError(f"{path}: expected a checkpoint directory with config.json and safetensors files")
    check_checkpoint(directory)  # the loader's check of config.json against every header, before any work
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise StoreError(f"{directory / 'config.json'}: cannot be read as a transformers config ({err})") from None
    reader = reader or PreadReader()
    layout = checkpoint_layout(directory, reader)
    dtype = dtype or main_dtype(layout)
    model, family = _build(directory, config, dtype)
    blocks = view(model)
    index = {b.layer: i for i, b in enumerate(blocks)}
    modules = {b.layer: b.experts.module for b in blocks}
    kinds = {b.layer: _kind(b.experts.module) for b in blocks}
    parts, taken = expert_parts(layout, modules, family)
    parts = {(index[layer], e): p for (layer, e), p in parts.items()}
    for b in blocks:
        missing = [e for e in range(b.num_experts) if (index[b.layer], e) not in parts]
        if missing:
            raise StoreError(f"{directory}: layer {b.layer}: experts {missing} not found in the checkpoint")
    sizer = ExpertStore({(0, 0): next(iter(parts.values()))}, 1, None, reader, 0, dtype)  # bytes in memory
    expert_bytes = sum(sizer.expert_bytes(ps) for ps in parts.values())
    budget = parse_memory(expert_memory, expert_bytes)
    slot = max(sizer.expert_bytes(ps) for ps in parts.values())
    pol = make_policy(policy, ExpertStore.slots_for(budget, slot), len(blocks), max(b.num_experts for b in blocks))
    names = {m: n for n, m in model.named_modules()}
    expert_names = {f"{names[modules[layer]]}.{n}" for layer in modules
                    for n in _expert_matrices(modules[layer], kinds[layer])}
    if budget >= expert_bytes:
        from moekit.hf.checkpoint import load

        reader.close()
        model = load(directory, dtype=dtype)
        resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return Offloaded(model, None, {}, expert_bytes, resident - expert_bytes,
                         f"expert memory {budget} bytes holds all experts ({expert_bytes} bytes): loaded fully "
                         "resident")
    expected = {n for n in model.state_dict() if n not in expert_names}
    loaded = set()
    resident_bytes = 0
    for name, loc in layout.items():
        if name in taken:
            continue
        target = name
        for old, new in _RENAMES:
            if target not in expected and old in name:
                target = name.replace(old, new)
        if target not in expected:
            raise StoreError(f"{loc.file}: tensor {name} is not part of the {family.name} model built from "
                             "config.json; expected the config's tensors only")
        t = whole_part(loc).read(reader)
        resident_bytes += loc.nbytes
        _set_tensor(model, target, t.to(dtype) if t.is_floating_point() else t)
        loaded.add(target)
    tied = "lm_head.weight" in expected - loaded and getattr(config, "tie_word_embeddings", False)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
        loaded.add("lm_head.weight")
    if expected - loaded:
        raise StoreError(f"{directory}: tensors {sorted(expected - loaded)[:5]} missing from the checkpoint")
    for name in expert_names:  # the store holds these: shapes kept, no memory
        old = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
        _set_tensor(model, name, torch.empty(old.shape, dtype=old.dtype, device="meta"))
    store = ExpertStore(parts, budget, pol, reader, workers, dtype)
    experts = {}
    for b in blocks:
        module, i = b.experts.module, index[b.layer]
        width = max(module.widths) if kinds[b.layer] != "dense" and getattr(module, "widths", None) \
            else b.experts.intermediate_size if kinds[b.layer] == "dense" else module.intermediate_size
        experts[i] = OffloadedExperts(i, kinds[b.layer], module, b.experts if kinds[b.layer] == "dense" else None,
                                      store, b.num_experts, config.hidden_size, width, dtype)
        module.forward = experts[i]
    return Offloaded(model, store, experts, expert_bytes, resident_bytes,
                     f"{store.policy.capacity} of {len(parts)} experts cached ({budget} bytes budget, "
                     f"{slot} bytes per expert slot)")


def peak_rss_bytes() -> int:
    """This process's peak resident set size: Linux's VmHWM, the high-water mark of this program's own memory.
    (`getrusage`'s ru_maxrss survives exec, so a process started by a large parent would report the parent's peak.)
    Elsewhere ru_maxrss."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_for_generate(model_path: str | None, expert_memory: str, policy: str = "lru", prefetch: str = "none",
                      dtype: torch.dtype = torch.float32, predictor: str | None = None):
    """`(offloaded, prefetcher or None, tokenizer)` for `moekit generate --expert-memory`: the default model when
    `model_path` is None; the path predictor from `predictor` (a directory), else from `MODEL-predictor` beside
    the model's directory."""
    from transformers import AutoTokenizer

    from moekit.default import default_model_path
    from moekit.runtime.prefetch import CONFIG, PathPredictor, Prefetcher

    path = Path(default_model_path() if model_path is None else model_path)
    off = load_offloaded(path, expert_memory, policy, dtype=dtype)
    prefetcher = None
    if prefetch != "none" and off.store is not None:
        model = None
        if prefetch == "predictor":
            where = Path(predictor) if predictor else Path(f"{path}-predictor")
            if not (where / CONFIG).is_file():
                raise ConfigError(f"--prefetch predictor: no {CONFIG} in {where}; expected a path predictor saved "
                                  "by `moekit bench offload --save-predictor DIR` (default DIR: MODEL-predictor)")
            model = PathPredictor.load(where)
        prefetcher = Prefetcher(off, prefetch, predictor=model, width=max(1, _k(off.model.config)))
    return off, prefetcher, AutoTokenizer.from_pretrained(path)


def _k(config) -> int:
    return int(family_of(config).k(config))


def offload_record(off: Offloaded, policy: str, prefetch: str) -> dict:
    """What `moekit generate --json` adds for an offloaded model."""
    s = off.store.stats if off.store is not None else None
    return {"expert_memory_bytes": off.store.budget_bytes if off.store else off.expert_bytes,
            "expert_bytes": off.expert_bytes, "resident_bytes": off.resident_bytes,
            "hit_rate": round(s.hit_rate, 4) if s else 1.0, "bytes_read": s.bytes_read if s else 0,
            "prefetched": s.prefetched if s else 0, "prefetch_used": s.prefetch_used if s else 0,
            "peak_cached_bytes": s.peak_cached_bytes if s else off.expert_bytes,
            "peak_rss_bytes": peak_rss_bytes(), "policy": policy, "prefetch": prefetch, "offload_note": off.note}
