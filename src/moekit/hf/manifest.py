"""Checkpoints of models whose MoE layers no longer fit their family's config (another expert count or expert width
in some layers, as pruning or merging leave them): the family's tensors under their in-memory names, a moekit
manifest, and a modeling file that lets plain transformers load them with `trust_remote_code=True`.

Layout written by `save_manifest` (into the temporary directory `save` renames into place):
  config.json            the family's config plus `moekit_layers` {layer: {num_experts, intermediate_size[, widths |
                         rank]}} (`widths`: per-expert widths of a layer of
                         `moekit.core.experts.ragged.RaggedExperts`; `rank`: the factor rank of a layer of
                         `moekit.core.experts.lowrank.LowRankExperts`) and
                         `auto_map` {"AutoModelForCausalLM": "modeling_moekit.MoekitForCausalLM"}
  moekit.json            {"format": "moekit-hf", "version": 1, "family": model_type, "layers": ...}
  modeling_moekit.py     the family's causal LM class, whose __init__ resizes the listed layers (needs only torch
                         and transformers; `resize_block` below is copied into it verbatim)
  model*.safetensors     tensors by their in-memory names (fused experts), sharded above `max_shard_size`
Quantized experts (`moekit.compress.quantize`) add `moekit_quant` {layer: {formats, group_size[, widths]}} (`widths`:
per-expert widths of experts of different widths, each quantized at its own) to config.json and
`quant` to moekit.json, and `moekit_qformat.py` (a copy of `moekit.core.experts.qformat`, torch only), which the
modeling file imports to put `QuantizedExperts` in those layers.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path

import torch
from torch import nn

from moekit.core.experts.lowrank import LowRankExperts, make_lowrank
from moekit.core.experts.ragged import RaggedExperts, glu, make_ragged
from moekit.hf.families import Family, family_of
from moekit.hf.headers import INDEX, SINGLE, CheckpointError, read_checkpoint
from moekit.hf.view import decoder_layers, view

MANIFEST = "moekit.json"
MODELING = "modeling_moekit.py"
QFORMAT = "moekit_qformat.py"
_QUANT_TENSOR = re.compile(r"\.(gate_up_q|down_q)\.\d+\.")
FORMAT = "moekit-hf"
VERSION = 1


def resize_block(block: nn.Module, num_experts: int, width: int, hidden: int, router: str, experts: str,
                 transposed: bool, bias: bool) -> None:
    """Give a MoE block's router and experts new, uninitialised tensors for `num_experts` experts of `width`
    (written into modeling_moekit.py as is: torch only)."""
    r, e = getattr(block, router), getattr(block, experts)
    like = {"dtype": e.gate_up_proj.dtype, "device": e.gate_up_proj.device}
    r.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=r.weight.dtype, device=r.weight.device))
    if getattr(r, "bias", None) is not None:
        r.bias = nn.Parameter(torch.empty(num_experts, dtype=r.bias.dtype, device=r.bias.device))
    if getattr(r, "e_score_correction_bias", None) is not None:
        r.e_score_correction_bias = r.e_score_correction_bias.new_zeros(num_experts)
    for module in (block, r, e):
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = num_experts
    if isinstance(r, nn.Linear):  # PhiMoE's router
        r.out_features = num_experts
    up = (num_experts, hidden, 2 * width) if transposed else (num_experts, 2 * width, hidden)
    down = (num_experts, width, hidden) if transposed else (num_experts, hidden, width)
    e.gate_up_proj = nn.Parameter(torch.empty(up, **like))
    e.down_proj = nn.Parameter(torch.empty(down, **like))
    if bias:
        e.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * width, **like))
        e.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden, **like))
    for name in ("intermediate_dim", "intermediate_size"):
        if isinstance(getattr(e, name, None), int):
            setattr(e, name, width)


_MODELING = '''"""Written by moekit: a {name} model whose MoE layers differ from its config in expert count or width
(config.moekit_layers lists them). Load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)."""

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
{quant_import}
_Base = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["{model_type}"])


{resize_source}

{ragged_source}

{lowrank_source}

class MoekitForCausalLM(_Base):
    # the experts are the family's own (decorated with use_experts_implementation); transformers finds that by
    # reading the defining module's source, which for this class is this file, so say it here
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config):
        super().__init__(config)
        for layer, spec in config.moekit_layers.items():
            block = getattr(self.model.layers[int(layer)], "{block}")
            resize_block(block, spec["num_experts"], spec["intermediate_size"], config.hidden_size, "{router}",
                         "{experts}", {transposed}, {bias})
            if "widths" in spec:
                make_ragged(block, spec["widths"], config.hidden_size, "{experts}")
            if "rank" in spec:
                make_lowrank(block, spec["rank"], config.hidden_size, "{experts}")
{quant_swap}'''

_QUANT_SWAP = '''        for layer, spec in config.moekit_quant.items():
            block = getattr(self.model.layers[int(layer)], "{block}")
            setattr(block, "{experts}", QuantizedExperts.like(getattr(block, "{experts}"), spec["formats"],
                                                             spec["group_size"], {transposed}, {bias},
                                                             spec.get("widths")))
'''


def quantized_layers(model: nn.Module) -> dict[int, dict]:
    """{layer: {formats, group_size[, widths]}} of every MoE layer whose experts are held quantized."""
    return {b.layer: b.experts.module.quant_spec() for b in view(model) if hasattr(b.experts.module, "quant_spec")}


def layer_shapes(model: nn.Module) -> dict[int, tuple[int, int]]:
    """{layer: (experts, width)} of every MoE layer whose shape differs from the config's."""
    config = model.config
    family = family_of(config)
    want = (family.num_experts(config), family.width(config))
    blocks = view(model)
    ragged = {b.layer for b in blocks if isinstance(b.experts.module, (RaggedExperts, LowRankExperts))}
    shapes = {b.layer: (b.num_experts, b.experts.intermediate_size) for b in blocks}
    return {layer: shape for layer, shape in shapes.items() if shape != want or layer in ragged}


def check_float_experts(model: nn.Module) -> None:
    for block in view(model):
        if not block.experts.gate_up_proj.dtype.is_floating_point:
            raise CheckpointError(f"layer {block.layer}: experts stored as {block.experts.gate_up_proj.dtype}; "
                                  f"expected floating-point experts (quantized experts are not supported yet)")


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def save_manifest(model: nn.Module, directory: Path, max_shard_size: str = "2GB") -> None:
    """Write `model` (a supported family, any expert count and width per layer) into the empty `directory`."""
    from safetensors.torch import save_file

    check_float_experts(model)
    config = model.config
    family = family_of(config)
    layers = {str(i): {"num_experts": e, "intermediate_size": w} for i, (e, w) in layer_shapes(model).items()}
    for block in view(model):
        if isinstance(block.experts.module, RaggedExperts):
            layers[str(block.layer)]["widths"] = block.experts.module.widths
        if isinstance(block.experts.module, LowRankExperts):
            layers[str(block.layer)]["rank"] = block.experts.module.rank
    quant = {str(layer): spec for layer, spec in quantized_layers(model).items()}
    seen: set[int] = set()
    state = {}
    for name, t in model.state_dict().items():  # safetensors refuses shared storage: a tied tensor's 2nd name copies
        t = t.detach().contiguous()
        state[name] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    shards = _shards(state, _parse_size(max_shard_size))
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=1))
    config = copy.deepcopy(config)
    config.moekit_layers = layers
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING[:-3]}.MoekitForCausalLM"}
    manifest = {"format": FORMAT, "version": VERSION, "family": family.model_type, "layers": layers}
    if quant:
        from moekit.core.experts import qformat  # torch only, copied verbatim

        config.moekit_quant = manifest["quant"] = quant
        (directory / QFORMAT).write_text(inspect.getsource(qformat))
    config.save_pretrained(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (directory / MODELING).write_text(_modeling_source(family, bool(quant)))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def prune_auto_map(directory: Path, shown: str | Path | None = None) -> list[str]:
    """Drop from `directory`/config.json every `auto_map` entry whose module file `directory` does not hold (a config
    copied from a checkpoint with its own modeling code: moekit saves the family's own classes and never copies a
    checkpoint's code, and transformers cannot load, with `trust_remote_code`, a module that is not there). Says so
    on stderr, naming the checkpoint `shown` (default `directory`); returns the entries dropped."""
    import sys

    path = directory / "config.json"
    config = json.loads(path.read_text())
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        return []

    def present(ref: object) -> bool:  # "module.Class", or [slow, fast] for tokenizers; "repo--module.Class" is remote
        refs = ref if isinstance(ref, list) else [ref]
        return all(r is None or (isinstance(r, str) and "--" not in r and "/" not in r
                                 and (directory / (r.rsplit(".", 1)[0].replace(".", "/") + ".py")).is_file())
                   for r in refs)

    dropped = sorted(key for key, ref in auto_map.items() if not present(ref))
    if not dropped:
        return []
    kept = {key: ref for key, ref in auto_map.items() if key not in dropped}
    if kept:
        config["auto_map"] = kept
    else:
        del config["auto_map"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"moekit: note: {Path(shown or directory) / path.name}: auto_map entries {', '.join(dropped)} dropped: "
          f"their modules are not in the checkpoint (moekit saves the family's own transformers classes, never a "
          f"checkpoint's code)", file=sys.stderr)
    return dropped


def _modeling_source(family: Family, quant: bool = False) -> str:
    names = {"block": family.block, "experts": family.experts, "transposed": family.transposed, "bias": family.bias}
    return _MODELING.format(name=family.name, model_type=family.model_type, router=family.router, **names,
                            resize_source=inspect.getsource(resize_block),
                            ragged_source="\n\n".join(inspect.getsource(f) for f in (glu, RaggedExperts, make_ragged)),
                            lowrank_source=inspect.getsource(LowRankExperts) + "\n\n" + inspect.getsource(make_lowrank),
                            quant_import=f"from .{QFORMAT[:-3]} import QuantizedExperts\n" if quant else "",
                            quant_swap=_QUANT_SWAP.format(**names) if quant else "")


def read_manifest(directory: Path) -> dict:
    """moekit.json, checked: its format and version, and for every layer a positive expert count and width, one
    width per expert for ragged layers, a positive rank, and one known quant format per expert."""
    from moekit.files import MAX_JSON_BYTES, read_bounded

    path = directory / MANIFEST
    try:
        manifest = json.loads(read_bounded(path, MAX_JSON_BYTES, "moekit manifest", CheckpointError))
        layers = {int(i): (int(s["num_experts"]), int(s["intermediate_size"])) for i, s in manifest["layers"].items()}
        widths = {int(i): [int(w) for w in s["widths"]] for i, s in manifest["layers"].items() if "widths" in s}
        ranks = {int(i): int(s["rank"]) for i, s in manifest["layers"].items() if "rank" in s}
        quant = {int(i): {"formats": [str(f) for f in s["formats"]], "group_size": int(s["group_size"]),
                          "widths": None if s.get("widths") is None else [int(w) for w in s["widths"]]}
                 for i, s in manifest.get("quant", {}).items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError,
            OverflowError):
        raise CheckpointError(f"{path}: corrupt manifest: expected JSON with 'format', 'version', 'layers' "
                              f"{{layer: {{num_experts, intermediate_size[, widths | rank]}}}} and optionally 'quant' "
                              f"{{layer: {{formats, group_size[, widths]}}}}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                              f"expected {FORMAT!r} version {VERSION}")
    _check_layer_specs(path, layers, widths, ranks, quant)
    if quant:
        from moekit.core.experts.qformat import BITS

        bad = sorted({f for spec in quant.values() for f in spec["formats"] if f not in BITS})
        if bad:
            raise CheckpointError(f"{path}: quant format {bad[0]!r}; expected one of {', '.join(BITS)}")
    return {"family": manifest.get("family"), "layers": layers, "widths": widths, "ranks": ranks, "quant": quant}


def _check_layer_specs(path: Path, layers: dict, widths: dict, ranks: dict, quant: dict) -> None:
    for layer, (experts, width) in layers.items():
        where = f"{path}: layers[{str(layer)!r}]"
        if layer < 0 or experts < 1 or width < 1:
            raise CheckpointError(f"{where}: num_experts={experts}, intermediate_size={width}; expected a layer "
                                  f"index >= 0 and positive sizes")
        if layer in widths and (len(widths[layer]) != experts or not all(0 < w <= width for w in widths[layer])):
            raise CheckpointError(f"{where}: widths has {len(widths[layer])} entries; expected {experts} (one per "
                                  f"expert), each in [1, {width}]")
        if ranks.get(layer, 1) < 1:
            raise CheckpointError(f"{where}: rank={ranks[layer]}; expected a positive rank")
    for layer, spec in quant.items():
        experts = layers.get(layer, (len(spec["formats"]), 0))[0]
        if layer < 0 or not spec["formats"] or len(spec["formats"]) != experts or spec["group_size"] < 1:
            raise CheckpointError(f"{path}: quant[{str(layer)!r}]: {len(spec['formats'])} formats, group_size="
                                  f"{spec['group_size']}; expected one format per expert and a positive group size")


def build_manifest_model(config, manifest: dict, family: Family, dtype: torch.dtype, source: Path,
                         **kwargs) -> nn.Module:
    """The family's model from `config` with the layers `manifest` lists resized, made ragged, low-rank or
    quantized; its tensors are uninitialised (on the meta device when called under `torch.device("meta")`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    layers = decoder_layers(model)
    for layer, (experts, width) in manifest["layers"].items():
        resize_block(getattr(layers[layer], family.block), experts, width, config.hidden_size, family.router,
                     family.experts, family.transposed, family.bias)
        if layer in manifest["widths"]:
            make_ragged(getattr(layers[layer], family.block), manifest["widths"][layer], config.hidden_size,
                        family.experts)
        if layer in manifest["ranks"]:
            make_lowrank(getattr(layers[layer], family.block), manifest["ranks"][layer], config.hidden_size,
                         family.experts)
    if manifest["quant"]:
        from moekit.core.experts.quantized import DispatchedQuantizedExperts  # run by moekit's dispatch

        for layer, spec in manifest["quant"].items():
            block = getattr(layers[layer], family.block)
            try:
                experts = DispatchedQuantizedExperts.like(getattr(block, family.experts), spec["formats"],
                                                          spec["group_size"], family.transposed, family.bias,
                                                          spec["widths"])
            except ValueError as err:
                raise CheckpointError(f"{source}: quant layer {layer}: {err}") from None
            setattr(block, family.experts, experts)
    return model


def load_manifest(directory: Path, config, dtype: torch.dtype | None = None, manifest: dict | None = None,
                  headers: dict | None = None, **kwargs) -> nn.Module:
    """Build the family's model from `config`, resize the layers the manifest lists, load the tensors (by their
    in-memory names) and refuse any missing, unexpected or misshapen one. `manifest` and `headers`: what
    `read_manifest` and `read_checkpoint` already returned for `directory`."""
    from safetensors.torch import load_file

    manifest = manifest or read_manifest(directory)
    family = family_of(config, source=str(directory / "config.json"))
    if manifest["family"] != family.model_type:
        raise CheckpointError(f"{directory / MANIFEST}: family {manifest['family']!r} but config.json says "
                              f"{family.model_type!r}; expected the same")
    headers = headers or read_checkpoint(directory)
    config.auto_map = {}  # built here from moekit's own code, not the checkpoint's modeling file
    dtype = dtype or main_dtype(headers)
    model = build_manifest_model(config, manifest, family, dtype, directory / MANIFEST, **kwargs)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    _check_tensors(directory, expected, {name: info.shape for name, info in headers.items()})
    state = {}
    for file in sorted({info.file for info in headers.values()}):
        state.update(load_file(directory / file))
    model.load_state_dict(state, strict=True)
    return model.eval()


def main_dtype(headers: dict) -> torch.dtype:
    """The float dtype holding most bytes of the checkpoint's tensors other than quantized codes."""
    return _main_dtype({name: info for name, info in headers.items() if not _QUANT_TENSOR.search(name)})


def _main_dtype(headers: dict) -> torch.dtype:
    """The dtype holding most bytes of the checkpoint."""
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    by_dtype: dict[str, int] = {}
    for info in headers.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    floating = [d for d in sorted(by_dtype, key=by_dtype.get, reverse=True) if d in names]
    return names[floating[0]] if floating else torch.float32


def _check_tensors(directory: Path, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    where = f"{directory / MANIFEST} with config.json"
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{where}: expects {name} {list(shape)}, missing from the weights")
        if tuple(found[name]) != shape:
            raise CheckpointError(f"{where}: expects {name} {list(shape)}, the weights hold {list(found[name])}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: does not expect {extra[0]} found in the weights")
