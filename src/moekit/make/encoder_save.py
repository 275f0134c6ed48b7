"""A MoEfied BERT encoder as a checkpoint plain transformers loads with `trust_remote_code=True`, and
sentence-transformers too when the input was a sentence-transformers model.

Layout (`save_encoder`, written into a temporary sibling and renamed into place):
  config.json             the BERT config plus `moekit_moe` {layers, num_experts, expert_width, k} and
                          `auto_map` {"AutoModel": "modeling_moekit_bert.MoekitBertModel"}
  moekit.json             {"format": "moekit-encoder", "version": 1, "family": "bert", "moe": ...}
  modeling_moekit_bert.py `MoekitBertModel`: a `BertModel` whose listed layers hold `MoekitBertFFN` (E gelu experts
                          with biases and a linear top-k router, the chosen ones added at weight 1, as
                          `make.encoder.MoEFFN` computes), torch and transformers only
  model.safetensors       the tensors by their in-memory names
  tokenizer files, and the sentence-transformers files of the input (modules.json, 1_Pooling/, ...) when present
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from moekit.errors import ConfigError

MODELING = "modeling_moekit_bert.py"
MANIFEST = "moekit.json"
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

MODELING_SOURCE = '''"""A BERT encoder with its FFNs split into experts (moekit make; torch and transformers only)."""

import torch
from torch import nn
from transformers import BertModel


class MoekitBertExperts(nn.Module):
    def __init__(self, num_experts, hidden, width):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, width, hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, width))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, width))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden))


class MoekitBertFFN(nn.Module):
    """y = sum over the k experts with the largest router logits of down_e gelu(up_e x + b_e) + c_e, plus out_bias."""

    def __init__(self, hidden, num_experts, width, k):
        super().__init__()
        self.experts = MoekitBertExperts(num_experts, hidden, width)
        self.out_bias = nn.Parameter(torch.zeros(hidden))
        self.router = nn.Parameter(torch.zeros(num_experts, hidden))
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        chosen = (flat @ self.router.t()).topk(self.k, dim=-1).indices
        out = torch.zeros_like(flat)
        e = self.experts
        for i in range(e.gate_up_proj.shape[0]):
            rows = (chosen == i).any(-1).nonzero().flatten()
            if rows.numel():
                h = nn.functional.gelu(flat[rows] @ e.gate_up_proj[i].t() + e.gate_up_proj_bias[i])
                out.index_add_(0, rows, h @ e.down_proj[i].t() + e.down_proj_bias[i])
        return (out + self.out_bias).view_as(x)


class MoekitBertModel(BertModel):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        moe = config.moekit_moe
        for i in moe["layers"]:
            layer = self.encoder.layer[i]
            layer.intermediate = MoekitBertFFN(config.hidden_size, moe["num_experts"], moe["expert_width"], moe["k"])
            layer.output.dense = nn.Identity()
'''


def moe_layers(model: nn.Module) -> dict:
    """{layers, num_experts, expert_width, k} of a MoEfied encoder; ConfigError when no layer is MoEfied or the
    layers differ."""
    from moekit.make.encoder import MoEFFN, bert_layers

    found = {i: ly.intermediate for i, ly in enumerate(bert_layers(model)) if isinstance(ly.intermediate, MoEFFN)}
    if not found:
        raise ConfigError("model: no MoEfied layer; expected an encoder after moefy_encoder")
    if any(f.norm_router is not None for f in found.values()):
        raise ConfigError("model: dynamic-k (router=d2d) layers; the saved modeling file runs a fixed top-k, "
                          "expected a top-k router")
    shapes = {(f.experts.num_experts, f.experts.down_proj.shape[-1], f.k) for f in found.values()}
    if len(shapes) != 1:
        raise ConfigError(f"model: MoEfied layers of different shapes {sorted(shapes)}; expected one E, width, k")
    (experts, width, k), = shapes
    return {"layers": sorted(found), "num_experts": experts, "expert_width": width, "k": k}


def save_encoder(model: nn.Module, out: str | os.PathLike, source: str | os.PathLike | None = None,
                 plan: dict | None = None, force: bool = False) -> Path:
    """Write a MoEfied BertModel (`make.encoder.moefy_encoder`) to the new or empty directory `out` (replaced when
    `force`), with the tokenizer and sentence-transformers files of `source` (the dense model's directory) when it
    has them."""
    from safetensors.torch import save_file

    from moekit.files import check_output, swap_in, temp_dir

    moe = moe_layers(model)
    out_dir = check_output(out, [source] if source else [])
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out}: not empty; expected an empty or new directory (or --force)")
    config = model.config.to_dict()
    config.update(moekit_moe=moe, architectures=["MoekitBertModel"],
                  auto_map={"AutoModel": "modeling_moekit_bert.MoekitBertModel"})
    with temp_dir(out_dir, "make-encoder") as tmp:
        state = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / MODELING).write_text(MODELING_SOURCE)
        (tmp / MANIFEST).write_text(json.dumps({"format": "moekit-encoder", "version": 1, "family": "bert",
                                                "moe": moe, **({"plan": plan} if plan else {})}))
        if source is not None:
            src = Path(source)
            for name in (*_TOKENIZER, *_ST_FILES):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            if (src / "modules.json").is_file():
                for module in json.loads((src / "modules.json").read_text()):
                    path = module.get("path", "")
                    if path and (src / path).is_dir():
                        shutil.copytree(src / path, tmp / path)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        swap_in(tmp, out_dir)
    return out_dir


def make_encoder_checkpoint(model_path: str, out: str, experts: int, k: int, partition: str, router: str,
                            layers: list[int] | None, data: list[str] | None, max_tokens: int, seed: int,
                            force: bool) -> dict:
    """`moekit make` for a BERT encoder directory (a sentence-transformers model's root works too)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from moekit.compress.run import check_out
    from moekit.data import read_documents
    from moekit.hf.checkpoint import CheckpointError
    from moekit.make import PARTITIONS, ROUTERS
    from moekit.make.encoder import capture_encoder_inputs, moefy_encoder
    from moekit.make.partition import check_split
    from moekit.make.routers import DATA_ROUTERS

    routers = [r for r in ROUTERS if r != "dino"]  # dino copies pieces into a native decoder family only
    if partition not in PARTITIONS or router not in routers:
        raise ConfigError(f"--method {partition} / --router {router}: a BERT encoder is split, not upcycled; expected "
                          f"--method in {', '.join(PARTITIONS)} and --router in {', '.join(routers)}")
    if (partition == "coactivation" or router in DATA_ROUTERS) and not data:
        raise ConfigError(f"--method {partition} / --router {router}: needs calibration text; expected --data FILE")
    source = Path(model_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{source / 'config.json'}: not a valid BERT config ({str(err).splitlines()[0]})"
                              ) from None
    check_split(config.intermediate_size, experts)  # every size checked before any weight is read
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ConfigError(f"k={k!r}: expected an integer in 1..experts={experts}")
    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source / 'config.json'}: hidden_act={config.hidden_act!r}; expected 'gelu'")
    docs = read_documents(data) if data else []
    out_dir = check_out(out, source, data or [], force)
    try:
        model = AutoModel.from_pretrained(source, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: could not load the encoder ({str(err).splitlines()[0]})") from None
    inputs = None
    if docs:
        tok = AutoTokenizer.from_pretrained(source)
        texts = [d.text for d in docs]
        batches = [tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                   for i in range(0, len(texts), 32)]
        inputs = capture_encoder_inputs(model, batches, list(range(model.config.num_hidden_layers)), max_tokens)
    moefy_encoder(model, experts, k, partition, router, layers, inputs, seed)
    plan = {"experts": experts, "k": k, "partition": partition, "router": router, "seed": seed}
    save_encoder(model, out_dir, source, plan, force=True)
    return {"source_type": "bert", "target_type": "moekit-bert (trust_remote_code)", **plan, "out": str(out_dir),
            "layers": moe_layers(model)["layers"],
            "sentence_transformers": (source / "modules.json").is_file()}


def load_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The saved encoder through plain transformers (`AutoModel`, trust_remote_code=True), in eval mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()
