"""`moekit generate --expert-memory ... --prefetch pregate` reads the Read-ME pre-gate `moekit make --pregate` saved
beside the model and prefetches what it predicts."""

from __future__ import annotations

import json
import shutil

import pytest
from make_families import made_with_pregate

from moekit.cli.main import main
from moekit.make.pregate import PREGATE_CONFIG, PREGATE_DIR, PreGate
from moekit.runtime.store import ExpertStore


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return made_with_pregate(tmp_path_factory.mktemp("pregate_generate"))[1]


def generate(capsys, model, *extra) -> dict:
    capsys.readouterr()
    assert main(["generate", str(model), "--prompt", "def add(x, y):", "--max-new-tokens", "6", "--json",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_prefetches_by_the_saved_pregate(made, capsys, monkeypatch):
    plain = generate(capsys, made)
    none = generate(capsys, made, "--expert-memory", "25%")
    predicted, requested = [], []
    experts = PreGate.experts

    def spy_experts(self, ids):
        out = experts(self, ids)
        predicted.extend(sorted((layer, e) for e in set(x.reshape(-1).tolist())) for layer, x in enumerate(out))
        return out

    prefetch = ExpertStore.prefetch

    def spy_prefetch(self, keys, protect=()):
        requested.append(list(keys))
        return prefetch(self, keys, protect)

    monkeypatch.setattr(PreGate, "experts", spy_experts)
    monkeypatch.setattr(ExpertStore, "prefetch", spy_prefetch)
    rec = generate(capsys, made, "--expert-memory", "25%", "--prefetch", "pregate")
    assert rec["text"] == plain["text"] == none["text"] and rec["prefetch"] == "pregate"
    assert rec["prefetched"] > 0 and none["prefetched"] == 0
    # one pre-gate call per decode step (prefill prefetches nothing); what was asked of the store is exactly its
    # prediction, layer by layer
    assert len(predicted) == 2 * (rec["new_tokens"] - 1) >= 2
    assert requested == predicted  # layer 0 when the step's ids are seen, layer 1 after layer 0's gate


def test_generate_prefetch_pregate_without_one_exits_2(made, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(made, bare, ignore=shutil.ignore_patterns(PREGATE_DIR))
    capsys.readouterr()
    assert main(["generate", str(bare), "--prompt", "x", "--max-new-tokens", "2", "--expert-memory", "25%",
                 "--prefetch", "pregate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and PREGATE_CONFIG in err[0] and "no pre-gating router" in err[0]
    assert "moekit make --pregate" in err[0]
