"""`moekit bench continual`: TAME and SEMA against plain sequential fine-tuning on permuted digits with recurring
tasks (A B C A B C by default: growth should stay at 3 experts / adapters for 6 segments). Task boundaries are not
given to any method. Per method: accuracy on every task after each segment, the first task's forgetting (its
accuracy right after its first segment minus at the end), final mean accuracy, experts or adapters used, detected
switches, seconds. SEMA's frozen backbone is pre-trained on task 0's training half first (its "pre-trained model").
Second setting: moekit-tiny's held-out corpus as next-byte tasks, prose, code, prose, code (2 epochs of 20,000
positions per segment). Third: river's SEA functions 0 1 2 3 0 1 2 3 as tasks (the drift bench's concepts as a
stream of batches; 5,000 instances per segment, 2 epochs).
"""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

from moekit.adapt.continual import SEMA, TAME, TaskSequence, corpus_domains, mlp, permuted_digits, sea_concepts
from moekit.bench.drift import machine

COLUMNS = ["data", "method", "seed", "final_mean_acc", "first_task_after", "first_task_end", "forgetting", "experts",
           "segments", "seconds"]


class Sequential:
    """Plain sequential fine-tuning of one network (the baseline)."""

    def __init__(self, d_in: int, n_classes: int, hidden: int = 64, lr: float = 1e-3):
        self.net = mlp(d_in, hidden, n_classes)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.net(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).argmax(-1)


def _accuracies(method, seq: TaskSequence) -> list[float]:
    if isinstance(method, TAME):
        method.fit_selector()
    return [float((method.predict(x) == y).float().mean()) for x, y in seq.test]


def run(method, seq: TaskSequence, epochs: int, batch_size: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    after: list[list[float]] = []
    start = time.perf_counter()
    for task in seq.order:
        x, y = seq.train[task]
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                method.observe(x[idx], y[idx])
        after.append(_accuracies(method, seq))
    seconds = time.perf_counter() - start
    first = seq.order[0]
    experts = (len(method.experts) if isinstance(method, TAME) else len(method.adapters)
               if isinstance(method, SEMA) else 1)
    return {"after_each_segment": after, "final_mean_acc": sum(after[-1]) / len(after[-1]),
            "first_task_after": after[0][first], "first_task_end": after[-1][first],
            "forgetting": after[0][first] - after[-1][first], "experts": experts, "segments": len(seq.order),
            "seconds": seconds}


def _pretrained_backbone(seq: TaskSequence, hidden: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    net = Sequential(seq.train[0][0].shape[1], seq.n_classes, hidden)
    x, y = seq.train[0]
    for _ in range(30):
        for idx in torch.randperm(len(x)).split(64):
            net.observe(x[idx], y[idx])
    return net.net


def _make(name: str, seq: TaskSequence, seed: int):
    d = seq.train[0][0].shape[1]
    if name == "tame":
        return TAME(d, seq.n_classes, seed=seed)
    if name == "sema":
        return SEMA(_pretrained_backbone(seq, 64, seed), d, seed=seed)
    return Sequential(d, seq.n_classes)


def bench_continual(seeds: int = 3, quick: bool = False, order: tuple[int, ...] = (0, 1, 2, 0, 1, 2),
                    epochs: int = 5, batch_size: int = 32, corpus_samples: int = 20_000,
                    corpus_epochs: int = 2) -> list[dict]:
    if quick:
        seeds, order, epochs, corpus_samples, corpus_epochs = 1, (0, 1, 0), 2, 2_000, 1
    info = machine()
    records = []
    for seed in tqdm(range(seeds), desc="continual", leave=False):
        settings = [("digits", permuted_digits(n_tasks=max(order) + 1, order=list(order), seed=seed), epochs),
                    ("corpus", corpus_domains(samples=corpus_samples, seed=seed), corpus_epochs),
                    ("sea", sea_concepts(samples=corpus_samples // 4, seed=seed), corpus_epochs)]
        for data, seq, n_epochs in settings:
            for name in ("sequential", "tame", "sema"):
                torch.manual_seed(seed)
                method = _make(name, seq, seed)
                r = run(method, seq, n_epochs, batch_size, seed)
                if isinstance(method, TAME):
                    r["events"] = method.events
                if isinstance(method, SEMA):
                    r["expansions"] = method.expansions
                records.append({"data": data, "method": name, "seed": seed, "order": seq.order,
                                "epochs": n_epochs, **r, **info})
    return records
