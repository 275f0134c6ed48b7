"""Tiny dense decoders for the make tests (none depends on the shipped default model)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def dense_config(model_type: str, width: int = 72, layers: int = 2, vocab: int = 100):
    """A tiny dense config: DeepSeek-V3 with every layer dense (first_k_dense_replace = num_hidden_layers, as the
    default model's dense twin), or a Qwen2 / Qwen3 / Llama."""
    common = dict(hidden_size=32, intermediate_size=width, num_hidden_layers=layers, num_attention_heads=4,
                  vocab_size=vocab, max_position_embeddings=64)
    if model_type == "deepseek_v3":
        return AutoConfig.for_model("deepseek_v3", **common, num_key_value_heads=4, moe_intermediate_size=8,
                                    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
                                    topk_group=1, first_k_dense_replace=layers, q_lora_rank=None, kv_lora_rank=16,
                                    qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5)
    return AutoConfig.for_model(model_type, **common, num_key_value_heads=2, head_dim=8)


def dense_model(model_type: str, dtype=torch.float32, ffn_std: float = 0.2, **kw):
    """The dense model, its FFN weights drawn with std `ffn_std` so that the FFN's share of the output is large
    (at the default init of 0.02 the FFNs barely move the logits and an equality test would prove little)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(dense_config(model_type, **kw)).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.normal_(0, ffn_std)
    return model


TEXT = ("def add(x, y):\n    return x + y\n\nThe quick brown fox jumps over the lazy dog. "
        "A mixture of experts routes each token to a few of its feed-forward networks.\n")


def save_tiny_tokenizer(directory, vocab: int = 300) -> int:
    """A byte-level BPE of about `vocab` tokens trained on TEXT, saved as tokenizer.json with an EOS token; returns
    its vocabulary size (the tests' models use it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    return tok.get_vocab_size()


WORDS = ["the", "a", "fox", "dog", "cat", "runs", "jumps", "over", "under", "quick", "lazy", "brown", "red", "code",
         "python", "list", "of", "experts", "token"]


def tiny_bert_dir(directory, seed: int = 0):
    """A tiny BertModel and a WordPiece tokenizer over WORDS, saved in `directory`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    tok.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).eval().save_pretrained(directory)
    return tok


def perturbed_branches(model, n: int = 2, seed: int = 10) -> list:
    """n copies of `model`, copy d with every parameter moved by 0.05 * N(0, 1) noise of seed `seed + d`: branches
    that differ everywhere, as trained branches would."""
    out = []
    for d in range(n):
        b = copy.deepcopy(model)
        g = torch.Generator().manual_seed(seed + d)
        with torch.no_grad():
            for p in b.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.append(b)
    return out


def made_with_pregate(tmp):
    """`moekit make` of a tiny dense DeepSeek-V3 (its own tokenizer) into 8 experts, top-2, with a Read-ME pre-gate
    calibrated on TEXT: (the dense source dir, the output dir, the vocabulary size)."""
    from moekit.cli.main import main

    src = tmp / "dense"
    vocab = save_tiny_tokenizer(src)
    dense_model("deepseek_v3", vocab=vocab).save_pretrained(src)
    data = tmp / "cal.txt"
    data.write_text(TEXT * 10)
    out = tmp / "moe"
    assert main(["make", str(src), "--experts", "8", "--k", "2", "--data", str(data), "--pregate", "--out",
                 str(out)]) == 0
    return src, out, vocab
