"""Composing experts from adapters: domains of real text, one PEFT LoRA per domain, and LoRA-MoE layers that
route among a pool of LoRA experts (MixLoRA top-k, DynMoLE, LoRA-Mixer, MoRA, Hydra, MHR/Poly), on linear layers
and on the fused expert parameters of transformers v5 MoE blocks.

Layout (PEFT's tuners habit: one idea per file): `domains` (text and windows), `lora` (train one adapter),
`adapters` (read, check and write saved PEFT adapters; the LoRA init record), `rules` (routing rules as pure
functions), `lora_moe` (the layer and the `LoraMoE` handle), `expert_lora` (the mixture on fused expert
parameters), `mixers` (MoRA, Hydra, Poly/MHR), `loop` (training loop and perplexity), `mixing` (what `moekit lora
mix` runs). Model-level routing and merging (compose B) live in their own files of this package.
"""

from moekit.compose.adapters import LoraAdapter, LoraWeights, check_pool, load_base, read_adapter, read_weights
from moekit.compose.domains import DOMAINS, domain_documents, domain_windows, split_documents, token_windows
from moekit.compose.expert_lora import ExpertsLoraMoE
from moekit.compose.loop import evaluate_ppl, fit
from moekit.compose.lora import attention_targets, expert_parameter_targets, load_adapter, train_domain_lora
from moekit.compose.lora_moe import LoraMoE, LoraMoELinear, LoraPool
from moekit.compose.mixers import HydraLinear, InputRouting, MoRALinear, poly_model
from moekit.compose.mixing import mix_checkpoint, routing_accuracy
from moekit.compose.rules import RULES, Mix, RuleConfig, route

__all__ = ["DOMAINS", "RULES", "ExpertsLoraMoE", "HydraLinear", "InputRouting", "LoraAdapter", "LoraMoE",
           "LoraMoELinear", "LoraPool", "LoraWeights", "Mix", "MoRALinear", "RuleConfig", "attention_targets",
           "check_pool",
           "domain_documents", "domain_windows", "evaluate_ppl", "expert_parameter_targets", "fit", "load_adapter",
           "load_base", "mix_checkpoint", "poly_model", "read_adapter", "read_weights", "route", "routing_accuracy",
           "split_documents", "token_windows", "train_domain_lora"]
