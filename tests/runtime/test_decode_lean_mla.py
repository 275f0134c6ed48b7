"""moekit.runtime.decode_lean_mla: the lean one-token step of DeepSeek-V3/V2 (multi-head latent attention) gives
transformers' greedy tokens and the model forward's logits, with transformers' or moekit's experts and with
quantized experts; models or caches it does not reproduce take the model's forward."""

from __future__ import annotations

import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_config, tiny_model
from moekit.bench import decode_llama
from moekit.runtime.decode import Decoder
from moekit.runtime.decode_lean import LEAN_FAMILIES, LeanStep
from runtime.test_decode import hf_greedy

N = 32  # new tokens compared
# q_lora_rank None (q_proj) and an int (q_a_proj -> q_a_layernorm -> q_b_proj); all layers MoE or the first dense;
# interleaved rope pairs (DeepSeek-V3's default) or halves; q/k head dim equal to v's (as in moekit-tiny v2); no MoE
# layer at all (first_k_dense_replace = num_hidden_layers)
CASES = {
    "v3-q_proj-all-moe": ("deepseek_v3", dict(q_lora_rank=None, first_k_dense_replace=0)),
    "v3-q_lora-first-dense": ("deepseek_v3", dict(q_lora_rank=24, first_k_dense_replace=1)),
    "v3-q_proj-first-dense-rope-halves": ("deepseek_v3", dict(q_lora_rank=None, first_k_dense_replace=1,
                                                              rope_interleave=False)),
    "v3-q_lora-all-moe-qk-eq-v": ("deepseek_v3", dict(q_lora_rank=24, first_k_dense_replace=0, qk_nope_head_dim=6,
                                                      qk_rope_head_dim=4, head_dim=4, v_head_dim=10)),
    "v3-all-dense": ("deepseek_v3", dict(q_lora_rank=None, first_k_dense_replace=3)),  # the dense twin's shape
    "v2-q_proj": ("deepseek_v2", dict(q_lora_rank=None)),
    "v2-q_lora-all-moe": ("deepseek_v2", dict(q_lora_rank=24, first_k_dense_replace=0)),
}


def _model(family: str, **overrides):
    # no end-of-sequence token: every one of the N tokens is compared; weights at 10x the default scale, so logits
    # are O(1) and attention is not near uniform (a 1e-5 tolerance then catches a wrong softmax scale)
    model = tiny_model(family, eos_token_id=None, initializer_range=0.2, **overrides)
    model.set_attn_implementation("sdpa")
    return model


def _ids(seed: int = 1, n: int = 7) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _lean_and_forward_logits(model, ids: torch.Tensor, n: int, monkeypatch) -> tuple[list, list, Decoder]:
    """Greedy steps through the lean step and through the model forward side by side (the lean decoder's
    tokens fed to both); the lean steps run with the model body's forward made to fail, so they cannot use it."""
    lean, full = Decoder(model), Decoder(model, lean=False)
    a, b = lean.prefill(ids), full.prefill(ids)
    ours, theirs = [a], [b]
    for _ in range(n - 1):
        token = int(a.argmax())
        with monkeypatch.context() as m:
            m.setattr(model.model, "forward", _no_forward)
            a = lean.step(token)
        b = full.step(token)
        ours.append(a)
        theirs.append(b)
    return ours, theirs, lean


def _no_forward(*_args, **_kwargs):
    raise AssertionError("the model body's forward ran during a lean step")


@pytest.mark.parametrize("case", list(CASES))
def test_lean_mla_step_equals_transformers(case, monkeypatch):
    family, overrides = CASES[case]
    model = _model(family, **overrides)
    ids = _ids()
    ref = hf_greedy(model, ids, N)
    assert len(ref[0]) == N
    dec = Decoder(model)
    assert dec.generate(ids, N).tokens == ref
    assert dec.lean and family in LEAN_FAMILIES
    ours, theirs, lean = _lean_and_forward_logits(model, ids, N, monkeypatch)
    assert [int(x.argmax()) for x in ours] == ref[0]
    for step, (x, y) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=f"step {step}")
    # the cache the lean steps wrote holds what the forward writes: compressed latents and rotated rope keys
    full = Decoder(model, lean=False)
    full.prefill(torch.cat([ids, torch.tensor([ref[0][:N - 1]])], dim=1))
    for mine, theirs_ in zip(lean.cache.layers, full.cache.layers, strict=True):
        assert mine.keys.shape[1] == 1 and mine.keys.shape[-1] == model.config.kv_lora_rank
        torch.testing.assert_close(mine.keys, theirs_.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs_.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["v3-q_proj-all-moe", "v3-q_lora-first-dense"])
def test_lean_mla_step_with_moekit_experts_and_quantized_experts(case):
    from moekit.compress.quantize import apply_quant, plan_quant

    family, overrides = CASES[case]
    model = _model(family, **overrides)
    ids = _ids(2)
    ref = hf_greedy(model, ids, N)
    mh.accelerate(model)  # experts through moekit's dispatch
    dec = Decoder(model)
    assert dec.generate(ids, N).tokens == ref and dec.lean
    mh.restore(model)
    apply_quant(model, plan_quant(model, None, "int8"))  # the MoE block is the model's own: quantized experts run
    ref_q = hf_greedy(model, ids, N)
    dec = Decoder(model)
    assert dec.generate(ids, N).tokens == ref_q and dec.lean
    mh.accelerate(model)
    assert Decoder(model).generate(ids, N).tokens == ref_q


YARN = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64,
        "mscale_all_dim": 1.0, "mscale": 1.0, "beta_fast": 32, "beta_slow": 1}


def test_models_and_caches_the_step_does_not_reproduce_take_the_forward():
    ids = _ids(3)
    yarn = _model("deepseek_v3", rope_parameters=YARN)  # yarn: another rope table and the mscale'd softmax scale
    assert yarn.model.layers[0].self_attn.scaling != yarn.model.layers[0].self_attn.qk_head_dim ** -0.5
    dec = Decoder(yarn)
    assert dec.generate(ids, 12).tokens == hf_greedy(yarn, ids, 12) and not dec.lean
    eager = tiny_model("deepseek_v3", eos_token_id=None, initializer_range=0.2)  # eager attention
    dec = Decoder(eager)
    assert dec.generate(ids, 12).tokens == hf_greedy(eager, ids, 12) and not dec.lean
    model = _model("deepseek_v3")
    dec = Decoder(model)
    dec.prefill(ids)
    assert dec.lean and LeanStep.supports(model, dec.cache)
    from transformers import DynamicCache

    assert not LeanStep.supports(model, DynamicCache(config=model.config))  # transformers' own cache layers
    fewer_kv = _model("deepseek_v3", num_key_value_heads=2)  # key heads below query heads: refused
    assert not LeanStep.supports(fewer_kv, dec.cache)



@pytest.mark.parametrize(("q_lora_rank", "layers", "refused"), [(None, 3, True), (24, 3, False), (None, 27, False)])
def test_llama_cpp_peer_knows_the_deepseek_models_it_cannot_load(tmp_path, q_lora_rank, layers, refused):
    """bench decode's llama.cpp peer: llama.cpp's DeepSeek-2 loader requires q_lora_rank except for 26- or 27-layer
    models; such a model is reported (the benchmark records why) before any conversion."""
    tiny_config("deepseek_v3", q_lora_rank=q_lora_rank, num_hidden_layers=layers).save_pretrained(tmp_path)
    reason = decode_llama.unsupported(tmp_path)
    assert (reason is not None) == refused
    assert reason is None or "requires q_lora_rank" in reason


@pytest.mark.slow
@pytest.mark.skipif(not decode_llama.available(), reason="llama_cpp or its source tree absent (make bench-peers)")
def test_llama_cpp_peer_routes_deepseek_v3_with_sigmoid(tmp_path):
    """transformers' DeepSeek-V3 config has no scoring_func; converted as it is, llama.cpp would gate with softmax.
    With the converter told "sigmoid", llama.cpp's f32 greedy tokens are transformers'."""
    import shutil

    from moekit.default import default_model_path

    model = tiny_model("deepseek_v3", eos_token_id=None, initializer_range=0.2, vocab_size=4096,
                       tie_word_embeddings=True, n_group=1, topk_group=1)
    model.save_pretrained(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, tmp_path / "m" / name)
    gguf = decode_llama.convert(tmp_path / "m", tmp_path, "fp32")
    ids = _ids(4, 9)
    ref = hf_greedy(model, ids, 12)[0]
    assert decode_llama.greedy_runner(gguf, 1, 32)(ids[0].tolist(), 12) == ref


def test_serve_engine_batches_deepseek_v3_rows_as_each_alone():
    """The serving engine over a DeepSeek-V3 model (lean steps for one row, batched forwards with holes and
    compaction in the compressed-latent cache for several): every request gets the text it gets alone."""
    from transformers import AutoTokenizer

    from moekit.default import default_model_path
    from moekit.serve.engine import Engine, Request

    model = _model("deepseek_v3", vocab_size=4096, q_lora_rank=None)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    engine = Engine(model, tok, max_batch=3, max_running=5, max_len=17, max_wait=2)
    prompts = ["The cat", "def f(x):", "Once upon a time there", "import numpy", "Hello", "The river flows"]
    lengths = [9, 4, 7, 12, 3, 6]
    done: dict[int, dict] = {}
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.submit(Request(tok(p).input_ids, n, lambda ev, i=i: done.__setitem__(i, ev), id=str(i)))
    engine.run_until_idle()
    assert engine.decoder.lean and engine.stats["compactions"] > 0
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        alone = Decoder(model).generate(tok(p, return_tensors="pt").input_ids, n).tokens[0]
        assert done[i]["text"] == tok.decode(alone, skip_special_tokens=True) and len(alone) == n
