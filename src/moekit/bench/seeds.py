"""`moekit bench seeds`: each seed system of issue 20 against its baseline on a small offline task (the tasks are
in `seed_tasks.py`), the paper's claim next to what is measured. Every contender of a system trains by the same
recipe from the same seed; `--seeds N` repeats with seeds 0..N-1 and reports medians. No timings: quality numbers
only (sparsity, experts engaged and per-class accuracy where the claim is about them).

Systems: mowst, tlc, mdcs, advmoe, advmoe_cnn, moe_x, thor, sparse_ot, mote, compressed, union, moduleformer
(the last two on byte-level language modelling, `seeds_modular.py`). Full run: a few minutes on 2 cores;
--quick: a smoke run of a few seconds per system.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moekit.bench.seed_tasks import GCN, MLP, ConvMoENet, MoENet, digits_graph, digits_long_tailed
from moekit.bench.seeds_modular import run_moduleformer, run_union
from moekit.bench.timing import environment
from moekit.errors import ConfigError

CLAIMS = {
    "mowst": "Mowst: better accuracy than the GNN alone at about its cost (confidence from the weak MLP's "
             "prediction decides who answers)",
    "tlc": "TLC: fewer experts for easy samples at comparable accuracy; uncertainty flags the hard (tail) ones",
    "mdcs": "MDCS: +1-2% accuracy on long-tailed benchmarks over prior multi-expert methods, gains on tail classes",
    "advmoe": "AdvMoE: +1-4% robust accuracy over vanilla adversarial training of the MoE",
    "advmoe_cnn": "AdvMoE on an MoE CNN (channel-group experts, image router): vanilla AT does not robustify the "
                  "MoE-CNN well; AdvMoE gains 1-4% robust accuracy over the dense CNN at about half its inference "
                  "cost",
    "moe_x": "MoE-X: much sparser, more interpretable hidden activations at comparable loss",
    "thor": "THOR: stochastic experts with KL consistency beat learned top-k gating (+2 BLEU over Switch)",
    "sparse_ot": "Sparsity-constrained OT: at most c tokens per expert, balanced, at comparable quality",
    "mote": "MoTE: ternary routed experts upcycled around the full-precision FFN match full precision at a fraction "
            "of the expert memory, and beat post-training quantization at equal memory",
    "compressed": "Compressed Experts: over 90% of full-expert performance recovered with over 30% fewer active "
                  "parameters",
    "union": "Union of Experts: attention heads and MLP parts of an equivalently decomposed transformer as routed "
             "experts beat full attention and MoEs at equal (or lower) compute",
    "moduleformer": "ModuleFormer: new modules learn new data with less forgetting than fine-tuning a dense model; "
                    "after load-concentration fine-tuning, the modules a task does not use can be pruned",
}
SYSTEMS = tuple(CLAIMS)


def _acc(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    ok = pred == y
    return float(ok[mask].float().mean()) if mask is not None else float(ok.float().mean())


def _fit(params, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(step).backward()
        opt.step()


def run_mowst(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.core.mowst import MowstClassifier

    torch.manual_seed(seed)
    g = digits_graph(k=8, corrupt=0.5, seed=seed)
    train, test = torch.nonzero(g.train).flatten(), g.test
    gcn = GCN(g.adj, 64, 64, 10)
    _fit(gcn.parameters(), lambda _: F.cross_entropy(gcn(g.x)[train], g.y[train]), steps)
    m = MowstClassifier(MLP(64, 64, 10), GCN(g.adj, 64, 64, 10))
    opt_w = torch.optim.Adam([*m.weak.parameters(), m.scale, m.shift], lr=1e-2)
    opt_s = torch.optim.Adam(m.strong.parameters(), lr=1e-2)
    for i in range(steps):
        phase, opt = ("strong", opt_s) if (i // max(1, steps // 8)) % 2 == 0 else ("weak", opt_w)
        opt.zero_grad()
        m.loss(g.x, g.x, g.y, phase, index=train).backward()
        opt.step()
    with torch.no_grad():
        weak_pred = m.weak(g.x).argmax(-1)
        mix, _ = m.predict(g.x, g.x, "mix")
        sample, used = m.predict(g.x, g.x, "sample", torch.Generator().manual_seed(seed))
        c = m(g.x, g.x).confidence
    return [
        {"contender": "gcn alone", "accuracy": _acc(gcn(g.x).argmax(-1), g.y, test)},
        {"contender": "mlp (weak) alone", "accuracy": _acc(weak_pred, g.y, test)},
        {"contender": "mowst (sample)", "accuracy": _acc(sample.argmax(-1), g.y, test),
         "strong_share": float(used[test].float().mean())},
        {"contender": "mowst* (mix)", "accuracy": _acc(mix.argmax(-1), g.y, test),
         "confidence_clean": float(c[test & ~g.corrupted].mean()),
         "confidence_corrupted": float(c[test & g.corrupted].mean())},
    ]


def _lt_groups(y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"head": y <= 2, "tail": y >= 7}


def run_tlc(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.core.tlc import TLCClassifier, TLCConfig

    torch.manual_seed(seed)
    d = digits_long_tailed(0.05, seed)
    groups = _lt_groups(d.y_test)
    out = []
    for name, n, thr in (("one evidential expert", 1, 1.0), ("tlc, all 3 experts", 3, 1e-9),
                         ("tlc, dynamic (u < 0.3)", 3, 0.3)):
        torch.manual_seed(seed)
        tlc = TLCClassifier([MLP(64, 32, 10) for _ in range(n)], TLCConfig(threshold=0.3))
        _fit(tlc.parameters(), lambda s, t=tlc: t.loss(d.x_train, d.y_train, s), steps, 5e-3)
        pred, engaged, u = tlc.predict(d.x_test, threshold=thr)
        out.append({"contender": name, "accuracy": _acc(pred, d.y_test),
                    **{f"accuracy_{k}": _acc(pred, d.y_test, m) for k, m in groups.items()},
                    "experts_per_sample": float(engaged.float().mean()),
                    **{f"experts_{k}": float(engaged[m].float().mean()) for k, m in groups.items()},
                    "uncertainty_tail_over_head": float(u[groups["tail"]].mean() / u[groups["head"]].mean())})
    return out


def run_mdcs(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.train.mdcs import MDCSConfig, augment, class_prior, mdcs_loss

    d = digits_long_tailed(0.05, seed)
    prior = class_prior(d.y_train, 10)
    groups = _lt_groups(d.y_test)
    out = []
    for name, cfg in (("3 experts, plain CE (lambda 0, no CS)", MDCSConfig(lambda_min=0.0, lambda_max=0.0,
                                                                           cs_weight=0.0)),
                      ("mdcs (DL + CS)", MDCSConfig())):
        torch.manual_seed(seed)
        experts = [MLP(64, 32, 10) for _ in range(3)]
        gen = torch.Generator().manual_seed(seed)

        def loss(_, ex=experts, c=cfg, g=gen):
            weak = [e(augment(d.x_train, False, g)) for e in ex]
            strong = [e(augment(d.x_train, True, g)) for e in ex]
            return mdcs_loss(weak, strong, d.y_train, prior, c)[0]

        _fit([p for e in experts for p in e.parameters()], loss, steps, 5e-3)
        with torch.no_grad():
            pred = torch.stack([e(d.x_test) for e in experts]).mean(0).argmax(-1)
        out.append({"contender": name, "accuracy": _acc(pred, d.y_test),
                    **{f"accuracy_{k}": _acc(pred, d.y_test, m) for k, m in groups.items()}})
    return out


def run_advmoe(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.train.advmoe import (
        AdvMoETrainer,
        PGDConfig,
        TradesAdvMoE,
        accuracy,
        robust_accuracy,
        vanilla_at_step,
    )

    d = digits_long_tailed(1.0, seed)
    train_pgd, test_pgd = PGDConfig(eps=0.1, alpha=0.025, steps=5), PGDConfig(eps=0.1, alpha=0.02, steps=10)
    out = []
    for name in ("vanilla AT (all parameters each step)", "advmoe (router / experts alternate)",
                 "advmoe, authors' TRADES form"):
        torch.manual_seed(seed)
        model = MoENet(experts=4, k=2)
        gen = torch.Generator().manual_seed(seed)
        if name.startswith("vanilla"):
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(steps):
                vanilla_at_step(model, opt, d.x_train, d.y_train, train_pgd, gen)
        elif "TRADES" in name:  # one expert and one router update per step
            trades = TradesAdvMoE(model, model.router_logits, 4, train_pgd)
            for _ in range(steps):
                trades.step(d.x_train, d.y_train, gen)
        else:  # the same number of parameter updates of the experts: two alternating steps per vanilla step
            trainer = AdvMoETrainer(model, train_pgd)
            for _ in range(2 * steps):
                trainer.step(d.x_train, d.y_train, gen)
        out.append({"contender": name, "clean_accuracy": accuracy(model, d.x_test, d.y_test),
                    "robust_accuracy": robust_accuracy(model, d.x_test, d.y_test, test_pgd,
                                                       torch.Generator().manual_seed(seed))})
    return out


def run_advmoe_cnn(steps: int, seed: int) -> list[dict[str, Any]]:
    """`ConvMoENet` (4 channel-group experts, top-1 per image) on balanced digits: the dense CNN of one expert's
    width and the MoE CNN under vanilla AT, the MoE CNN under AdvMoE (the authors' TRADES form); robust accuracy
    under PGD-10, and the share of test images whose expert the attack changes (router robustness)."""
    from moekit.train.advmoe import PGDConfig, TradesAdvMoE, accuracy, pgd_attack, vanilla_at_step

    d = digits_long_tailed(1.0, seed)
    train_pgd, test_pgd = PGDConfig(eps=0.1, alpha=0.025, steps=5), PGDConfig(eps=0.1, alpha=0.02, steps=10)
    out = []
    for name, experts in (("dense CNN (one expert's width), vanilla AT", 1), ("MoE CNN, vanilla AT", 4),
                          ("MoE CNN, advmoe (authors' TRADES form)", 4)):
        torch.manual_seed(seed)
        model = ConvMoENet(experts=experts)
        gen = torch.Generator().manual_seed(seed)
        if "advmoe" in name:
            trades = TradesAdvMoE(model, model.router_logits, experts, train_pgd)
            for _ in range(steps):
                trades.step(d.x_train, d.y_train, gen)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(steps):
                vanilla_at_step(model, opt, d.x_train, d.y_train, train_pgd, gen)
        adv = pgd_attack(model, d.x_test, d.y_test, test_pgd, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            moved = (model.router_logits(adv).argmax(-1) != model.router_logits(d.x_test).argmax(-1)).float()
        out.append({"contender": name, "clean_accuracy": accuracy(model, d.x_test, d.y_test),
                    "robust_accuracy": accuracy(model, adv, d.y_test),
                    "routing_changed": float(moved.mean()) if experts > 1 else 0.0})
    return out


def _selectivity(acts: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over live neurons of the share of a neuron's activation mass that falls on its top class."""
    mass = torch.stack([acts[y == c].sum(0) for c in range(10)])  # [10, N]
    total = mass.sum(0)
    live = total > 0
    return float((mass.max(0).values[live] / total[live]).mean()) if live.any() else 0.0


def run_moe_x(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.core.catalog.moe_x import ReLUExperts

    d = digits_long_tailed(1.0, seed)
    out = []
    for name, router in (("top-k MoE, GELU experts", "topk"), ("moe-x (ReLU experts, sparsity routing)", "moe_x")):
        torch.manual_seed(seed)
        net = MoENet(experts=8, k=2, hidden=32, router=router)
        if router == "topk":
            net.moe = type(net.moe)(32, 32, 8, 2, activation="gelu")
        _fit(net.parameters(), lambda _, n=net: F.cross_entropy(n(d.x_train), d.y_train), steps)
        with torch.no_grad():
            h = torch.relu(net.stem(d.x_test))
            r = net.moe(h).routing
            ex = net.moe.experts
            width = ex.intermediate_size
            acts = torch.zeros(len(h), 8 * width)
            for e in range(8):
                # GELU is never exactly 0: its positive part is counted, as a ReLU would keep it
                a = ex.activations(h, e) if isinstance(ex, ReLUExperts) else \
                    F.gelu(h @ ex.up_weight(e).T).clamp_min(0)
                used = (r.indices == e).any(-1, keepdim=True)
                acts[:, e * width:(e + 1) * width] = a * used
            out.append({"contender": name, "accuracy": _acc(net(d.x_test).argmax(-1), d.y_test),
                        "active_neurons_per_token": float((acts > 0).sum(-1).float().mean()),
                        "of_routed_neurons": 2 * width, "class_selectivity": _selectivity(acts, d.y_test)})
    return out


def run_thor(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.core.catalog.thor import thor_loss

    d = digits_long_tailed(1.0, seed)
    out = []
    for name in ("top-1 learned gating", "thor (random pair, CE + KL)", "thor, alpha = 0 (no consistency)"):
        torch.manual_seed(seed)
        net = MoENet(experts=4, k=1, router="topk" if name.startswith("top") else "thor")
        if name.startswith("top"):
            loss = lambda _, n=net: F.cross_entropy(n(d.x_train), d.y_train)  # noqa: E731
        else:
            alpha = 0.0 if "alpha = 0" in name else 1.0
            loss = lambda _, n=net, a=alpha: thor_loss(n, lambda: n(d.x_train), d.y_train, a)[0]  # noqa: E731
        _fit(net.parameters(), loss, steps)
        net.eval()
        with torch.no_grad():
            out.append({"contender": name, "accuracy": _acc(net(d.x_test).argmax(-1), d.y_test)})
    return out


def run_sparse_ot(steps: int, seed: int) -> list[dict[str, Any]]:
    d = digits_long_tailed(1.0, seed)
    out = []
    for name, router, opts in (("top-2", "topk", None), ("sinkhorn + cap (S-BASE)", "sinkhorn", None),
                               ("sparse_ot (semi-dual)", "sparse_ot", {"gamma": 0.5, "iterations": 100})):
        torch.manual_seed(seed)
        net = MoENet(experts=4, k=2, router=router, router_options=opts)
        _fit(net.parameters(), lambda _, n=net: F.cross_entropy(n(d.x_train[:256]), d.y_train[:256]), steps)
        net.eval()
        with torch.no_grad():
            x = torch.relu(net.stem(d.x_test[:256]))
            o = net.moe(x)
            counts = o.expert_counts.float()
            out.append({"contender": name, "accuracy": _acc(net(d.x_test[:256]).argmax(-1), d.y_test[:256]),
                        "load_cv": float(counts.std(unbiased=False) / counts.mean()),
                        "max_tokens_per_expert": int(counts.max()),
                        "experts_per_token": float(o.routing.experts_per_token().float().mean())})
    return out


def run_mote(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.compress.mote import MoTEConfig, MoTELayer, ternarize

    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 16))
    x, x_test = torch.randn(2048, 16), torch.randn(1024, 16)
    with torch.no_grad():
        t, t_test = teacher(x), teacher(x_test)
    up, down = nn.Parameter(torch.randn(64, 16) / 4), nn.Parameter(torch.randn(16, 64) / 8)
    _fit([up, down], lambda _: F.mse_loss(F.gelu(x @ up.T) @ down.T, t), 2 * steps)
    ffn_bytes = 4 * (up.numel() + down.numel())
    ternary_bytes = (up.numel() + down.numel()) // 4 + 2 * (up.numel() + down.numel()) // 16  # 2 bits + fp16/16
    with torch.no_grad():
        dense = float(F.mse_loss(F.gelu(x_test @ up.T) @ down.T, t_test))
        ptq = float(F.mse_loss(F.gelu(x_test @ ternarize(up, 16).T) @ ternarize(down, 16).T, t_test))
    layer = MoTELayer(up.detach(), down.detach(), MoTEConfig(num_experts=4, k=1, group_size=16), noise=0.05,
                      generator=torch.Generator().manual_seed(seed))
    _fit([p for p in layer.parameters() if p.requires_grad], lambda _: F.mse_loss(layer(x)[0], t), steps, 3e-3)
    with torch.no_grad():
        mote = float(F.mse_loss(layer(x_test)[0], t_test))
    return [{"contender": "dense FFN (fp32)", "test_mse": dense, "bytes": ffn_bytes},
            {"contender": "FFN, post-training ternary", "test_mse": ptq, "bytes": ternary_bytes},
            {"contender": "mote: FFN shared + 4 ternary experts (k=1)", "test_mse": mote,
             "bytes": ffn_bytes + 4 * ternary_bytes}]


def run_compressed(steps: int, seed: int) -> list[dict[str, Any]]:
    from moekit.compress.compressed_experts import CompressedExpertsConfig, CompressedMoE

    d = digits_long_tailed(1.0, seed)
    torch.manual_seed(seed)
    net = MoENet(experts=8, k=2, hidden=32)
    _fit(net.parameters(), lambda _: F.cross_entropy(net(d.x_train), d.y_train), steps)
    net.eval()
    cm = CompressedMoE(net.moe, CompressedExpertsConfig(keep=1, rank=4, steps=steps))
    with torch.no_grad():
        h_train, h = torch.relu(net.stem(d.x_train)), torch.relu(net.stem(d.x_test))
    cm.fit(h_train)
    active = cm.active_parameters()
    out = [{"contender": "full top-2", "accuracy": _acc(net(d.x_test).argmax(-1), d.y_test),
            "active_expert_params": active["full"]}]
    with torch.no_grad():
        for mode, label in (("drop", "top-1 only (second expert dropped)"), ("mean", "second expert's mean output"),
                            ("compressed", "compressed second expert (rank 4)")):
            pred = net.head(h + cm(h, mode)).argmax(-1)
            out.append({"contender": label, "accuracy": _acc(pred, d.y_test),
                        "active_expert_params": active["compressed"] if mode == "compressed" else
                        active["full"] // 2})
    return out


RUNNERS: dict[str, Callable[[int, int], list[dict[str, Any]]]] = {
    "mowst": run_mowst, "tlc": run_tlc, "mdcs": run_mdcs, "advmoe": run_advmoe, "advmoe_cnn": run_advmoe_cnn,
    "moe_x": run_moe_x, "thor": run_thor, "sparse_ot": run_sparse_ot, "mote": run_mote, "compressed": run_compressed,
    "union": run_union, "moduleformer": run_moduleformer,
}
STEPS = {"mowst": 320, "tlc": 300, "mdcs": 300, "advmoe": 150, "advmoe_cnn": 150, "moe_x": 300, "thor": 300,
         "sparse_ot": 200, "mote": 300, "compressed": 300, "union": 600, "moduleformer": 400}


def bench_seeds(systems: list[str] | None = None, quick: bool = False, seeds: int = 1) -> list[dict[str, Any]]:
    """Records: one per (system, contender) with the median of each metric over `seeds` seeds."""
    systems = list(systems or SYSTEMS)
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise ConfigError(f"--system {', '.join(unknown)}: expected some of {', '.join(SYSTEMS)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds={seeds!r}: expected a positive integer")
    env = environment()
    records = []
    for system in tqdm(systems, desc="seed systems"):
        steps = max(4, STEPS[system] // 20) if quick else STEPS[system]
        runs = [RUNNERS[system](steps, seed) for seed in range(seeds)]
        for i, row in enumerate(runs[0]):
            merged: dict[str, Any] = {"system": system, "contender": row["contender"]}
            for key in row:
                if key != "contender":
                    values = [r[i][key] for r in runs]
                    merged[key] = round(float(statistics.median(values)), 4)
            records.append({**merged, "steps": steps, "seeds": seeds, "paper_claim": CLAIMS[system], **env})
    return records


COLUMNS = ["system", "contender", "accuracy", "accuracy_head", "accuracy_tail", "experts_per_sample",
           "experts_head", "experts_tail", "strong_share", "clean_accuracy", "robust_accuracy", "routing_changed",
           "active_neurons_per_token", "class_selectivity", "load_cv", "max_tokens_per_expert", "test_mse", "bytes",
           "active_expert_params", "test_loss", "active_params", "active_share", "loss_a", "loss_b", "modules"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m moekit.bench.seeds", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--system", action="append", choices=SYSTEMS, help="run only this system (repeatable)")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.add_argument("--quick", action="store_true", help="a twentieth of the steps: a smoke run")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, medians (default 1)")


def run(args) -> int:
    import json

    records = bench_seeds(args.system, args.quick, args.seeds)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    rows = [[("-" if r.get(c) is None else str(r[c])) for c in COLUMNS] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
