"""moekit.runtime.decode: greedy tokens equal transformers' generate (fp32) on the default model and on tiny models
of every family, batched rows equal transformers' batched generate, the preallocated cache holds what transformers'
dynamic cache holds, bad input is a one-line error."""

from __future__ import annotations

import shutil

import pytest
import torch

import moekit.hf as mh
from hf.tiny import FAMILY_TYPES, tiny_model
from moekit.errors import ConfigError
from moekit.runtime.decode import Decoder, Sampling, load_for_decode, pad_batch
from moekit.runtime.decode_lean import LEAN_FAMILIES


def hf_greedy(model, ids: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> list[list[int]]:
    """transformers' greedy tokens after the prompt, each row cut after its end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


@pytest.fixture(scope="module")
def tiny_default():
    model, tok = load_for_decode(None, dtype="fp32", accelerate=False)
    ids = tok("def fibonacci(n):\n    if n < 2:\n", return_tensors="pt").input_ids
    return model, tok, ids


def test_default_model_greedy_equals_transformers(tiny_default):
    model, _, ids = tiny_default
    ref = hf_greedy(model, ids, 40)
    assert len(ref[0]) == 40  # moekit-tiny has no end-of-sequence token: all 40 compared
    lean = Decoder(model)
    assert lean.generate(ids, 40).tokens == ref
    assert lean.lean == (model.config.model_type in LEAN_FAMILIES)  # through SDPA: the lean step ran
    assert Decoder(model, lean=False).generate(ids, 40).tokens == ref
    mh.accelerate(model)  # experts through moekit's dispatch: still transformers' tokens
    try:
        assert Decoder(model).generate(ids, 40).tokens == ref
    finally:
        mh.restore(model)


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_every_family_greedy_equals_transformers(family):
    model = tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = hf_greedy(model, ids, 24)  # gpt_oss: sliding window 8, so the window slides in prefill and decode
    result = Decoder(model).generate(ids, 24)
    assert result.tokens == ref
    assert result.new_tokens == len(ref[0]) and result.prompt_tokens == 12
    assert result.decode_steps == len(ref[0]) - 1
    mh.accelerate(model)
    assert Decoder(model).generate(ids, 24).tokens == ref


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_lean_step_equals_transformers_under_sdpa(family):
    model = tiny_model(family)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    ref = hf_greedy(model, ids, 24)
    dec = Decoder(model)
    assert dec.generate(ids, 24).tokens == ref and dec.lean
    dec.prefill(ids)
    assert torch.equal(dec.step(ref[0][0]), _logits_after(model, ids, ref[0][0]))  # bit-equal logits
    mh.accelerate(model)
    assert Decoder(model).generate(ids, 24).tokens == ref
    other = tiny_model("olmoe")  # q/k norms over all heads: not the lean shape, the model's forward
    other.set_attn_implementation("sdpa")
    dec = Decoder(other)
    dec.prefill(ids)
    assert not dec.lean


def _logits_after(model, ids: torch.Tensor, token: int) -> torch.Tensor:
    dec = Decoder(model, lean=False)
    dec.prefill(ids)
    return dec.step(token)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_batch_of_different_lengths_equals_transformers_batched_generate(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 8)]
    ids, mask = pad_batch(seqs, pad_token_id=0)
    ref = hf_greedy(model, ids, 16, mask)
    result = Decoder(model).generate(ids, 16, attention_mask=mask)
    assert result.tokens == ref
    assert result.prompt_tokens == 24 and result.batch == 3
    # each row alone gives the same tokens as in the batch
    for row, seq in enumerate(seqs):
        assert Decoder(model).generate(torch.tensor(seq), 16).tokens[0] == ref[row]


def test_cache_after_prefill_and_step_matches_transformers_cache():
    from transformers import DynamicCache

    model = tiny_model("gpt_oss")  # one sliding and one full layer
    ids = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(3))
    dec = Decoder(model, max_len=32)
    logits = dec.prefill(ids)
    assert dec.length == 11 and dec.positions.tolist() == [11]
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        ref = model(ids, past_key_values=ref_cache, use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(logits, ref.logits[:, -1], rtol=0, atol=0)
    full, sliding = dec.cache.layers[1], dec.cache.layers[0]
    assert full._k.shape[2] == 32 and full.get_seq_length() == 11 and sliding.get_seq_length() == 11
    for ours, theirs in zip(dec.cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    nxt = logits.argmax(-1)
    step_logits = dec.step(nxt)
    with torch.no_grad():
        ref2 = model(nxt[:, None], past_key_values=ref_cache, use_cache=True, logits_to_keep=1,
                     position_ids=torch.tensor([[11]]))
    torch.testing.assert_close(step_logits, ref2.logits[:, -1], rtol=0, atol=0)
    assert dec.length == 12 and dec.positions.tolist() == [12] and full.get_seq_length() == 12
    assert torch.equal(full.keys[:, :, 11], ref_cache.layers[1].keys[:, :, 11])


def test_bf16_runs_and_stays_close_to_fp32(tiny_default):
    model32, _, ids = tiny_default
    model16, _ = load_for_decode(None, dtype="bf16", accelerate=False)
    assert next(model16.parameters()).dtype == torch.bfloat16
    l32, l16 = Decoder(model32).prefill(ids), Decoder(model16).prefill(ids)
    assert l16.dtype == torch.float32  # logits handed back in fp32
    assert bool((l32.argmax(-1) == l16.argmax(-1)).all())
    assert float((l32 - l16).abs().mean()) < 0.05 * float(l32.std())
    # bf16 greedy tokens equal transformers' bf16 greedy tokens (same modules, same tensors)
    assert Decoder(model16).generate(ids, 16).tokens == hf_greedy(model16, ids, 16)
    mh.accelerate(model16)
    assert len(Decoder(model16).generate(ids, 16).tokens[0]) == 16


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_default):
    model, _, ids = tiny_default
    dec = Decoder(model)
    greedy = dec.generate(ids, 12).tokens
    assert dec.generate(ids, 12, sampling=Sampling(top_k=1, seed=0)).tokens == greedy
    a = dec.generate(ids, 12, sampling=Sampling(temperature=1.5, seed=7)).tokens
    assert dec.generate(ids, 12, sampling=Sampling(temperature=1.5, seed=7)).tokens == a
    assert dec.generate(ids, 12, sampling=Sampling(temperature=1.5, top_p=0.9, seed=7)).tokens[0][0] >= 0


def test_on_token_streams_every_token(tiny_default):
    model, _, ids = tiny_default
    seen: list[int] = []
    result = Decoder(model).generate(ids, 10, on_token=lambda t: seen.extend(t))
    assert seen == result.tokens[0] and len(seen) == 10
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


def test_bad_input_is_a_one_line_error(tiny_default):
    model, _, _ = tiny_default
    dec = Decoder(model)
    with pytest.raises(ConfigError, match="the prompt has 600 tokens; the model's context is 256"):
        dec.generate(torch.zeros(600, dtype=torch.long), 4)
    with pytest.raises(ConfigError, match="need 270 positions; the model.s context is 256"):
        dec.generate(torch.zeros(250, dtype=torch.long), 21)
    dec.generate(torch.zeros(4, dtype=torch.long), 3)
    assert dec.capacity == 6 and dec.cache.layers[0]._k.shape[2] == 6  # the request's length, not the context
    with pytest.raises(ConfigError, match="need 7 positions; the cache holds 6 positions"):
        dec.step(0)
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        dec.generate(torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ConfigError, match="no sequence started"):
        Decoder(model).step(1)
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        load_for_decode(None, dtype="fp8")
    with pytest.raises(ConfigError, match="temperature=0"):
        Sampling(temperature=0)
    mh.accelerate(model)
    try:  # refused before anything compiles
        with pytest.raises(ConfigError, match="compile=True: torch.compile cannot trace moekit's dispatch"):
            Decoder(model, compile=True)
    finally:
        mh.restore(model)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v2"])
def test_continuous_batching_rows_equal_their_solo_decoding(family):
    """Rows joining a running batch (shorter and longer than its cache) and leaving it decode as they do alone."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 13, 3)]
    solo = [Decoder(model).generate(torch.tensor(p), 14, stop_at_eos=False).tokens[0] for p in prompts]
    dec = Decoder(model, max_len=64)
    got: list[list[int]] = [[], [], []]
    live = [0]  # prompt index of each row
    got[0].append(int(dec.add(prompts[0]).argmax()))
    for step in range(13):
        if step == 3:  # 13 tokens join a cache of 8 positions: the running row is shifted right
            live.append(1)
            got[1].append(int(dec.add(prompts[1]).argmax()))
        if step == 6:  # 3 tokens join a longer cache: the new row is left-padded
            live.append(2)
            got[2].append(int(dec.add(prompts[2]).argmax()))
        if step == 9:  # the longest row leaves; the left padding both others share (5 positions) goes with it
            before = dec.length
            dec.remove([1])
            live.pop(1)
            assert dec.length == before - 5 and dec.batch == 2
        logits = dec.step([got[p][-1] for p in live])
        for row, p in enumerate(live):
            got[p].append(int(logits[row].argmax()))
    assert got[0] == solo[0] and len(got[0]) == 14
    assert got[1] == solo[1][:len(got[1])] and len(got[1]) == 7
    assert got[2] == solo[2][:len(got[2])] and len(got[2]) == 8


def test_choose_accelerate_keeps_the_faster_experts_path(tiny_default, monkeypatch):
    from moekit.core import tune
    from moekit.runtime.decode import choose_accelerate

    model, _, _ = tiny_default
    try:
        assert choose_accelerate(model) is True and mh.is_accelerated(model)  # MOEKIT_TUNE=0: the default
        monkeypatch.setenv("MOEKIT_TUNE", "1")
        calls = []

        def fake(fns, budget_ms):  # noqa: ARG001 (the real one's signature)
            calls.append(sorted(fns))
            for fn in fns.values():
                fn()  # both paths really run
            return {"moekit": 2.0, "transformers": 1.0}

        monkeypatch.setattr(tune, "measure_ms", fake)
        assert choose_accelerate(model) is False and not mh.is_accelerated(model)
        monkeypatch.setattr(tune, "measure_ms", lambda _fns, **_kw: {"moekit": 1.0, "transformers": 3.0})
        assert choose_accelerate(model) is True and mh.is_accelerated(model)
        assert calls == [["moekit", "transformers"]]
    finally:
        mh.restore(model)


def test_any_family_checkpoint_loads_for_decode_and_a_missing_tokenizer_is_one_line(tmp_path):
    from moekit.default import default_model_path

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="no usable tokenizer"):
        load_for_decode(str(tmp_path / "m"), accelerate=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # moekit-tiny's tokenizer: ids above 97 never decoded
        shutil.copy(default_model_path() / name, tmp_path / "m" / name)
    loaded, tok = load_for_decode(str(tmp_path / "m"), accelerate=True)
    assert loaded.config.model_type == "mixtral" and mh.is_accelerated(loaded)
    ids = torch.tensor([[5, 17, 42, 8]])
    assert Decoder(loaded).generate(ids, 6).tokens == hf_greedy(model, ids, 6)
