import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.errors import ConfigError
from moekit.runtime.offload import load_offloaded
from moekit.runtime.taer import TaskPatterns, first_layer_routes, selection_scores, warm_start


def test_selection_scores_by_hand():
    idx = [torch.tensor([[0, 1], [0, 2]])]
    w = [torch.tensor([[0.75, 0.25], [0.5, 0.5]])]
    s = selection_scores(idx, w, 4)
    assert s.tolist() == [[0.625, 0.125, 0.25, 0.0]]


def test_nearest_pattern_and_resident_set(tmp_path):
    a = torch.tensor([[1.0, 0.5, 0, 0], [0, 0, 0.9, 0.1]])
    b = torch.tensor([[0, 0, 1.0, 0.5], [0.8, 0.2, 0, 0]])
    p = TaskPatterns(["code", "chat"], torch.stack([a, b]))
    assert p.nearest(torch.tensor([0.0, 0.1, 0.7, 0.6])) == 1
    assert p.resident_set(1, 3) == [(0, 2), (1, 0), (0, 3)]
    assert p.resident_set(0, 10) == [(0, 0), (1, 2), (0, 1), (1, 3)]  # never-chosen experts left out
    p.save(tmp_path / "t.json")
    again = TaskPatterns.load(tmp_path / "t.json")
    assert again.tasks == p.tasks and torch.equal(again.scores, p.scores)
    with pytest.raises(ConfigError, match="not a TAER pattern file"):
        TaskPatterns.load(tmp_path)


def test_warm_start_reads_the_matched_tasks_experts(tmp_path):
    path = tmp_path / "m"
    mh.save(tiny_model("qwen3_moe"), path)
    off = load_offloaded(path, "34%", workers=0)  # 4 of 12 experts
    ids = torch.tensor([[5, 7, 9, 11]])
    query = first_layer_routes(off, ids)
    assert off.store.stats.bytes_read == 0  # only the first gate ran
    assert query.sum() > 0
    other = torch.zeros(2, 6)
    other[:, 5] = 1.0
    mine = torch.stack([query, torch.full((6,), 0.1)])
    patterns = TaskPatterns(["other", "mine"], torch.stack([other, mine]))
    assert warm_start(off, patterns, ids) == "mine"
    assert set(off.store.cache) == set(patterns.resident_set(1, 4))
    with torch.no_grad():
        off.model(ids)
    assert off.store.stats.hits > 0
    with pytest.raises(ConfigError, match="MoE layers"):
        warm_start(off, TaskPatterns(["x"], torch.zeros(1, 3, 6)), ids)
    off.close()
