from moekit.bench.timing import interleaved


def test_interleaved_varies_order_and_runs_before_each_call():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    ms = interleaved(fns, repeats=20, warmup=1, before=lambda: calls.append("flush"))
    assert set(ms) == set("abcd") and all(v >= 0 for v in ms.values())
    timed = calls[4:]  # after one warmup call each (no flush before warmup)
    assert len(timed) == 2 * 4 * 20 and timed[0::2] == ["flush"] * 80
    order = timed[1::2]
    assert all(sorted(order[i:i + 4]) == list("abcd") for i in range(0, 80, 4))
    # no contender always follows the same one (a fixed rotation would hand it the same warm cache every round)
    predecessors = {name: {order[i - 1] for i in range(1, 80) if order[i] == name} for name in "abcd"}
    assert all(len(p) > 1 for p in predecessors.values())
