"""Per-document routing reports for `moekit route apply` beyond the per-document routers: Glider's per-token local
routing (Arrow's prototypes, or Glider's trained gates) over LoRA experts with the global router's scores as the
prior, and the P-Adapter's input-dependent weights over prompt experts. Each returns one JSON-ready row per document.
"""

from __future__ import annotations

import torch

from moekit.errors import ConfigError


def _ids(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    from moekit.data import encode

    return torch.tensor([encode(tokenizer, text)[:max_tokens] or [0]])


def glider_local_rows(router, model, tokenizer, adapters: dict[str, str], texts: list[str], alpha: float = 1.0,
                      k: int = 1, temperature: float = 0.1, max_tokens: int = 256, global_model=None,
                      global_tokenizer=None, gates=None) -> list[dict]:
    """For each text: the global router's choice, and the local routing weights averaged over tokens and layers
    (`local`, one value per expert, summing to 1) with their argmax `local_expert`. adapters maps each of the global
    router's experts to a PEFT adapter directory trained on `model`; gates: a file of Glider's trained gates for
    these adapters (save_gates), else the local router is Arrow's."""
    from moekit.compose.adapters import read_weights
    from moekit.compose.glider import Glider

    missing = [e for e in router.experts if e not in adapters]
    extra = [e for e in adapters if e not in router.experts]
    if missing or extra:
        raise ConfigError(f"--adapter: experts {sorted(adapters)}; expected one EXPERT=ADAPTER per expert of the "
                          f"global router ({', '.join(router.experts)})")
    if k < 1 or not temperature > 0:
        raise ConfigError(f"--k {k}, --temperature {temperature}: expected k >= 1 and temperature > 0")
    scores = router.scores(texts, global_model, global_tokenizer)
    glider = Glider(model, [read_weights(adapters[e]) for e in router.experts], alpha=alpha, k=k,
                    temperature=temperature)
    if gates is not None:  # Glider's trained gates (moekit route fit --gate-steps) instead of Arrow's prototypes
        glider.load_gates(gates, router.experts)
    rows = []
    try:
        for text, s in zip(texts, scores, strict=True):
            glider.set_global(s)
            with torch.no_grad():
                model(input_ids=_ids(tokenizer, text, max_tokens))
            w = torch.stack([layer.last_weights.mean(0) for layer in glider.layers.values()]).mean(0)
            rows.append({"category": router.experts[int(s.argmax())],
                         "local_expert": router.experts[int(w.argmax())],
                         "local": {e: float(x) for e, x in zip(router.experts, w, strict=True)}})
    finally:
        glider.detach()
    return rows


def p_adapter_rows(adapter, model, tokenizer, texts: list[str], max_tokens: int = 256) -> list[dict]:
    """For each text: the P-Adapter's weights over its prompt experts and the heaviest one."""
    from moekit.compose.p_adapters import PAdapterLM

    lm = PAdapterLM(model, adapter)
    rows = []
    with torch.no_grad():
        for text in texts:
            w = lm.route(_ids(tokenizer, text, max_tokens))[0]
            rows.append({"category": adapter.names[int(w.argmax())],
                         "weights": {e: float(x) for e, x in zip(adapter.names, w, strict=True)}})
    return rows
