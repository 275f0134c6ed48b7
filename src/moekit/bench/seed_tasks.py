"""Small offline tasks for the seed systems that need one, built from scikit-learn's bundled digits (1797 8x8
images, 10 classes of about 180; features scaled to [0, 1]) or from moekit's offline text corpus:

- `digits_long_tailed(imbalance)`: a balanced test set (a third of each class, stratified, seeded), and a
  long-tailed training set: class c (classes ordered 0..9) keeps round(n * imbalance^(c / 9)) of its n remaining
  images (geometric subsampling, as CIFAR-10-LT is built), so class 0 is the head and class 9 the tail.
- `digits_graph(k, corrupt)`: node classification with two modalities that help different nodes (Mowst's
  setting). A `corrupt` fraction of the nodes have 80% of their pixels zeroed and aggregate their k nearest
  neighbours (Euclidean, on the clean images): their own features are weak, their neighbourhood carries the label.
  The other nodes keep clean features and aggregate k random nodes (a heterophilous neighbourhood that carries
  nothing). Aggregation is the mean over the node and its k neighbours (A = D^-1 (A + I), directed).
  Train / test masks: half the nodes each, seeded.
- `text_task(domain)`: byte-level language modelling on one domain ("prose" or "code") of
  `moekit.train.corpus.build_corpus(max_docs_per_domain=docs)` (the same hash-chosen documents on every machine;
  prose is python3.11-doc's reST sources where installed, else pydoc_data). The domain's documents, joined by
  newlines in corpus order, are cut to `max_bytes` UTF-8 bytes; bytes >= 127 share id 127 (vocabulary 128). The
  first 90% is the training stream (random windows of seq_len + 1 bytes), the rest gives `test_windows` fixed
  test windows, evenly spaced.

Models: `MLP`, `MoENet` (an MLP stem and one MoE layer), `ConvMoENet` (AdvMoE's MoE CNN: experts are channel groups
of every convolution, one image router picks a group per sample), `GCN`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target, dtype=torch.long)


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y_train, minlength=10).tolist()


def digits_long_tailed(imbalance: float = 0.05, seed: int = 0) -> Split:
    """Long-tailed digits (module docstring); `imbalance` = tail size / head size, in (0, 1]."""
    if not 0 < imbalance <= 1:
        raise ConfigError(f"imbalance={imbalance!r}: expected a number in (0, 1]")
    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = len(idx) // 3
        test.append(idx[:n_test])
        rest = idx[n_test:]
        train.append(rest[: max(1, round(len(rest) * imbalance ** (c / 9)))])
    tr, te = torch.cat(train), torch.cat(test)
    return Split(x[tr], y[tr], x[te], y[te])


VOCAB = 128  # byte ids; every byte >= 127 is id 127


@dataclass
class TextTask:
    """train [N] byte ids; test [n, seq_len + 1] fixed windows."""

    train: Tensor
    test: Tensor

    def batch(self, size: int, generator: torch.Generator) -> Tensor:
        """[size, seq_len + 1] random windows of the training stream."""
        width = self.test.shape[1]
        start = torch.randint(0, len(self.train) - width, (size,), generator=generator)
        return self.train[start.unsqueeze(1) + torch.arange(width)]


@functools.lru_cache(maxsize=2)
def _corpus_bytes(docs: int, max_bytes: int) -> dict[str, Tensor]:
    from moekit.train.corpus import DOMAINS, build_corpus

    corpus = build_corpus(max_docs_per_domain=docs)
    out = {}
    for domain in DOMAINS:
        data = "\n".join(corpus.texts(domain=domain)).encode("utf-8")[:max_bytes]
        out[domain] = torch.tensor(list(data), dtype=torch.long).clamp_max(VOCAB - 1)
    return out


def text_task(domain: str, seq_len: int = 32, test_windows: int = 64, docs: int = 40,
              max_bytes: int = 400_000) -> TextTask:
    """Byte-level language modelling on one corpus domain (module docstring)."""
    from moekit.train.corpus import DOMAINS

    if domain not in DOMAINS:
        raise ConfigError(f"domain={domain!r}: expected one of {', '.join(DOMAINS)}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r}: expected a positive integer")
    data = _corpus_bytes(docs, max_bytes)[domain]
    cut = len(data) * 9 // 10
    n = min(test_windows, (len(data) - cut) // (seq_len + 1))
    if n < 1 or cut <= seq_len + 1:
        raise ConfigError(f"domain={domain!r}: {len(data)} bytes, too few for windows of seq_len={seq_len}")
    starts = cut + torch.arange(n) * ((len(data) - cut) // n)
    test = data[starts.unsqueeze(1) + torch.arange(seq_len + 1)]
    return TextTask(data[:cut], test)


@dataclass
class Graph:
    """x [N, 64] node features (some corrupted), adj [N, N] sparse mean aggregation D^-1 (A + I), y [N], masks."""

    x: Tensor
    adj: Tensor
    y: Tensor
    train: Tensor
    test: Tensor
    corrupted: Tensor


def digits_graph(k: int = 8, corrupt: float = 0.5, seed: int = 0) -> Graph:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r}: expected a positive integer")
    if not 0 <= corrupt <= 1:
        raise ConfigError(f"corrupt={corrupt!r}: expected a number in [0, 1]")
    x, y = _digits()
    n = len(y)
    g = torch.Generator().manual_seed(seed)
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    corrupted = torch.rand(n, generator=g) < corrupt
    near = dist.topk(k, largest=False).indices
    far = torch.rand(n, n, generator=g).fill_diagonal_(-1.0).topk(k).indices  # k random other nodes
    nbrs = torch.where(corrupted.unsqueeze(1), near, far)
    rows = torch.arange(n).repeat_interleave(k + 1)
    cols = torch.cat([torch.arange(n).unsqueeze(1), nbrs], 1).flatten()
    adj = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.full((n * (k + 1),), 1.0 / (k + 1)), (n, n),
                                  check_invariants=True)
    adj = adj.coalesce()
    keep = torch.rand(n, 64, generator=g) >= 0.8
    feats = torch.where(corrupted.unsqueeze(1), x * keep, x)
    order = torch.randperm(n, generator=g)
    train = torch.zeros(n, dtype=torch.bool)
    train[order[: n // 2]] = True
    return Graph(feats, adj, y, train, ~train, corrupted)


class MLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MoENet(nn.Module):
    """A small MoE classifier for flat images: stem Linear + ReLU, one residual MoE layer, linear head."""

    def __init__(self, dim_in: int = 64, hidden: int = 32, classes: int = 10, experts: int = 4, k: int = 1,
                 router: str = "topk", router_options: dict | None = None):
        super().__init__()
        from moekit.core.layer import MoE

        self.stem = nn.Linear(dim_in, hidden)
        self.moe = MoE(hidden, hidden, experts, k, router=router, router_options=router_options)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        return self.head(h + self.moe(h).hidden)

    def router_logits(self, x: Tensor) -> Tensor:
        """The MoE router's logits for each sample [N, E] (one token per sample)."""
        return self.moe.router.logits(torch.relu(self.stem(x)))


class GCN(nn.Module):
    """Two graph convolutions: logits = A relu(A X W1) W2 with the (sparse) aggregation matrix A."""

    def __init__(self, adj: Tensor, dim_in: int, hidden: int, classes: int):
        super().__init__()
        self.adj = adj
        self.w1, self.w2 = nn.Linear(dim_in, hidden), nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sparse.mm(self.adj, self.w2(torch.relu(torch.sparse.mm(self.adj, self.w1(x)))))


def select_group(out: Tensor, scores: Tensor, experts: int) -> Tensor:
    """AdvMoE's channel-group experts: out [B, E * w, H, W] (a conv's output), scores [B, E] -> [B, w, H, W], each
    sample's channel group of its top-1 expert. Forward: the hard one-hot; backward: the identity to the scores
    (straight-through, as the authors' GetMask passes the mask's gradient to the scores)."""
    hard = F.one_hot(scores.argmax(-1), experts).to(out.dtype)
    gate = hard + (scores - scores.detach())
    b, c, h, w = out.shape
    return (gate.view(b, experts, 1, 1, 1) * out.view(b, experts, c // experts, h, w)).sum(1)


class ConvMoENet(nn.Module):
    """A small MoE CNN for the 8x8 digits, built as the AdvMoE authors build theirs (OPTML-Group/Robust-MoE-CNN
    `models/layers/moe_layer.py`): every MoE convolution has E groups of `width` output channels (the experts); one
    router, a small CNN on the image, scores E experts per sample, and every MoE convolution keeps the channel group
    of the sample's top-1 expert, so the next layer sees `width` channels (a router-chosen pathway through the
    backbone).

        x [B, 1, 8, 8] -> conv 3x3 (E x w1) -> group -> ReLU -> max-pool 2 -> conv 3x3 (E x w2) -> group -> ReLU
          -> global average pool -> linear head;  router: conv 3x3 (r channels) -> ReLU -> average pool -> linear E

    `experts=1` is the dense CNN of the same active width. Input: flat [B, 64] in [0, 1] (as the other digits
    models take) or [B, 1, 8, 8]."""

    def __init__(self, experts: int = 4, width1: int = 8, width2: int = 16, router_channels: int = 8,
                 classes: int = 10):
        super().__init__()
        for name, v in (("experts", experts), ("width1", width1), ("width2", width2),
                        ("router_channels", router_channels)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: expected a positive integer")
        self.experts = experts
        self.conv1 = nn.Conv2d(1, experts * width1, 3, padding=1)
        self.conv2 = nn.Conv2d(width1, experts * width2, 3, padding=1)
        self.head = nn.Linear(width2, classes)
        self.router = nn.Sequential(nn.Conv2d(1, router_channels, 3, padding=1), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(router_channels, experts))

    @staticmethod
    def _image(x: Tensor) -> Tensor:
        return x.view(-1, 1, 8, 8)

    def router_logits(self, x: Tensor) -> Tensor:
        """The router's scores [B, E] (one per image)."""
        return self.router(self._image(x))

    def forward(self, x: Tensor) -> Tensor:
        img = self._image(x)
        scores = self.router(img)
        h = torch.relu(select_group(self.conv1(img), scores, self.experts))
        h = F.max_pool2d(h, 2)
        h = torch.relu(select_group(self.conv2(h), scores, self.experts))
        return self.head(h.mean((2, 3)))
