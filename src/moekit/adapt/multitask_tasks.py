"""Multi-task data and training: the MMoE paper's synthetic regression tasks with a controllable correlation, a
multi-task split of scikit-learn's bundled diabetes data, and a small seeded trainer.

Synthetic tasks (Ma et al., 2018, section 3.2): orthogonal unit vectors u1, u2 in R^d; w1 = c u1,
w2 = c (p u1 + sqrt(1 - p^2) u2); x ~ N(0, I_d);
y_i = w_i.x + sum_{j=1..m} sin(alpha_j w_i.x + beta_j) + eps_i, eps_i ~ N(0, 0.01). p is the cosine of w1 and w2
(the paper's task-correlation knob; the labels' Pearson correlation falls with it). alpha_j, beta_j ~ N(0, 1)
(the paper calls them given parameters without values; moekit draws them once per seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from moekit.errors import ConfigError


@dataclass
class TaskData:
    """x_train [N, D], ys_train [N, T], x_test, ys_test; `names` per task."""

    x_train: Tensor
    ys_train: Tensor
    x_test: Tensor
    ys_test: Tensor
    names: list[str]


def synthetic_tasks(n_train: int = 10_000, n_test: int = 2_000, d: int = 100, correlation: float = 0.5,
                    m: int = 10, c: float = 1.0, seed: int = 0) -> TaskData:
    if not -1 <= correlation <= 1:
        raise ConfigError(f"correlation={correlation}: expected a cosine in [-1, 1]")
    if d < 2 or m < 0 or n_train < 1 or n_test < 1:
        raise ConfigError(f"d={d}, m={m}, n_train={n_train}, n_test={n_test}: expected d >= 2, m >= 0, n >= 1")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w = np.stack([c * u1, c * (correlation * u1 + math.sqrt(1 - correlation**2) * u2)])  # [2, d]
    alpha, beta = rng.standard_normal(m), rng.standard_normal(m)
    x = rng.standard_normal((n_train + n_test, d))
    z = x @ w.T  # [N, 2]
    y = z + np.sin(alpha * z[..., None] + beta).sum(-1) + rng.normal(0, 0.1, z.shape)  # var 0.01
    x_t, y_t = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    return TaskData(x_t[:n_train], y_t[:n_train], x_t[n_train:], y_t[n_train:], ["task1", "task2"])


def diabetes_tasks(seed: int = 0) -> TaskData:
    """scikit-learn's bundled diabetes data (442 patients, no download) as two regression tasks: disease
    progression after a year, and serum s5 (log triglycerides, removed from the inputs). Standardised, 80/20 split."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x, names = data.data, list(data.feature_names)
    s5 = names.index("s5")
    ys = np.stack([data.target, x[:, s5]], axis=1)
    x = np.delete(x, s5, axis=1)
    order = np.random.default_rng(seed).permutation(len(x))
    x, ys = x[order], ys[order]
    cut = int(0.8 * len(x))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-12
    y_mean, y_std = ys[:cut].mean(0), ys[:cut].std(0)
    x, ys = (x - mean) / std, (ys - y_mean) / y_std
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)
    return TaskData(xt[:cut], yt[:cut], xt[cut:], yt[cut:], ["progression", "s5"])


def train(model: nn.Module, data: TaskData, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3,
          seed: int = 0) -> dict:
    """Adam on the sum of the tasks' MSE; returns {"test_mse": [per task], "train_mse": [...]} (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.x_train)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            outs = model(data.x_train[idx])
            loss = sum(nn.functional.mse_loss(o[:, 0], data.ys_train[idx, t]) for t, o in enumerate(outs))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"test_mse": evaluate(model, data.x_test, data.ys_test),
            "train_mse": evaluate(model, data.x_train, data.ys_train)}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, ys: Tensor) -> list[float]:
    model.eval()
    outs = model(x)
    return [float(nn.functional.mse_loss(o[:, 0], ys[:, t])) for t, o in enumerate(outs)]
