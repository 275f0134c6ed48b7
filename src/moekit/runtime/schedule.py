"""ExpertFlow-style token scheduling for batched decoding of many sequences.

Each pending sequence brings the experts its next token will use (predicted or known: one int per (layer, expert)
pair, e.g. `layer * E + e`). `pick_batch` chooses which sequences decode together in the next step so that the
batch activates few distinct experts, with a bounded wait: a sequence that has waited `max_wait` steps is always
chosen first. `simulate` replays per-step expert sets of many sequences and counts the experts activated per step
against first-come batching.
"""

from __future__ import annotations

from collections.abc import Sequence

from moekit.errors import ConfigError


def pick_batch(expert_sets: list[set[int]], max_batch: int, waited_steps: list[int], max_wait: int) -> list[int]:
    """Indices of the sequences to decode next (at most `max_batch`, as many as there are when fewer).

    Sequences whose wait reached `max_wait` come first (longest wait first). The rest of the batch is filled
    greedily: starting from the experts already in the batch (or from the longest-waiting sequence's), each step
    adds the sequence that brings the fewest experts not yet in the batch (ties: longer wait, then lower index)."""
    n = len(expert_sets)
    if len(waited_steps) != n:
        raise ConfigError(f"waited_steps has {len(waited_steps)} entries, expected one per sequence ({n})")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if max_wait < 0:
        raise ConfigError(f"max_wait must be at least 0, got {max_wait}")
    by_wait = sorted(range(n), key=lambda i: (-waited_steps[i], i))
    chosen = [i for i in by_wait if waited_steps[i] >= max_wait][:max_batch]
    if not chosen and n:
        chosen = [by_wait[0]]
    union: set[int] = set().union(*(expert_sets[i] for i in chosen)) if chosen else set()
    left = [i for i in range(n) if i not in set(chosen)]
    while len(chosen) < max_batch and left:
        best = min(left, key=lambda i: (len(expert_sets[i] - union), -waited_steps[i], i))
        chosen.append(best)
        union |= expert_sets[best]
        left.remove(best)
    return chosen


def pick_first_come(expert_sets: list[set[int]], max_batch: int, waited_steps: list[int],
                    max_wait: int) -> list[int]:  # noqa: ARG001 (pick_batch's signature)
    """The baseline: the longest-waiting sequences (then lower index), whatever their experts."""
    return sorted(range(len(expert_sets)), key=lambda i: (-waited_steps[i], i))[:max_batch]


def simulate(routes: Sequence[Sequence[set[int]]], max_batch: int, max_wait: int,
             scheduler: str = "expert") -> dict:
    """Decode every sequence to its end, one token per chosen sequence per step.

    `routes[s][t]` is the expert set of sequence s's token t. Returns steps, tokens, the mean number of distinct
    experts activated per step and per token, and the longest wait any sequence saw."""
    pick = {"expert": pick_batch, "first-come": pick_first_come}.get(scheduler)
    if pick is None:
        raise ConfigError(f"scheduler must be 'expert' or 'first-come', got {scheduler!r}")
    pos = [0] * len(routes)
    waited = [0] * len(routes)
    steps = tokens = activated = longest = 0
    while True:
        live = [s for s in range(len(routes)) if pos[s] < len(routes[s])]
        if not live:
            break
        sets = [routes[s][pos[s]] for s in live]
        batch = [live[i] for i in pick(sets, max_batch, [waited[s] for s in live], max_wait)]
        activated += len(set().union(*(routes[s][pos[s]] for s in batch)))
        for s in live:
            if s in batch:
                pos[s] += 1
                waited[s] = 0
            else:
                waited[s] += 1
                longest = max(longest, waited[s])
        steps += 1
        tokens += len(batch)
    return {"scheduler": scheduler, "steps": steps, "tokens": tokens,
            "experts_per_step": activated / max(steps, 1), "experts_per_token": activated / max(tokens, 1),
            "max_wait_seen": longest}
