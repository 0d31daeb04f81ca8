"""Low-rank induced training (LoRITa) against post-hoc truncation, on the handwritten digits of scikit-learn.

    python examples/lorita_digits.py [--quick] [--out docs/lorita_digits.md]

For a small MLP and a small vision transformer (2×2 patches of the 8×8 digits), at several rank budgets
(fraction of linear-layer parameters kept), test accuracy of:
  (a) normal training, then weight SVD truncation;
  (b) LoRITa: every linear over-parameterised as a product of 3, trained with weight decay, then collapsed
      and truncated (lrdeploy.torch.lorita);
  (c) normal training, then feature PCA on the training set (lrdeploy.torch.compress).
No fine-tuning after truncation in any column.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from lrdeploy.torch.compress import compress
from lrdeploy.torch.lorita import collapse, overparameterize

BUDGETS = (0.5, 0.3, 0.2, 0.1)


class MLP(torch.nn.Module):
    def __init__(self, hidden=256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    def forward(self, images):
        return self.net(images.reshape(images.shape[0], -1))


class Block(torch.nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        attention = torch.softmax(split(self.q(h)) @ split(self.k(h)).transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.o((attention @ split(self.v(h))).transpose(1, 2).reshape(b, n, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class ViT(torch.nn.Module):
    def __init__(self, dim=64, depth=2):
        super().__init__()
        self.patch = torch.nn.Linear(4, dim)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.position = torch.nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, images):
        b = images.shape[0]
        patches = images.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        x = torch.cat([self.cls.expand(b, -1, -1), self.patch(patches)], 1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


def data(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def train(model, x, y, epochs, weight_decay, lr=2e-3, seed=0):
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def run(make, epochs, budgets, multiple=1, seed=0):
    x_train, x_test, y_train, y_test = data(seed)
    torch.manual_seed(seed)
    normal = train(make(), x_train, y_train, epochs, weight_decay=1e-4, seed=seed)
    torch.manual_seed(seed)
    # the 4→64 patch embedding is left alone in every column: it cannot lose rank without losing pixels
    lorita = train(overparameterize(make(), depth=3, exclude=("patch",)), x_train, y_train, epochs,
                   weight_decay=5e-3, seed=seed)
    calib = [{"images": batch} for batch in x_train.split(256)]
    rows = [("dense", accuracy(normal, x_test, y_test), accuracy(copy.deepcopy(lorita), x_test, y_test), None)]
    for budget in budgets:
        svd = copy.deepcopy(normal)
        compress(svd, calib, budget, method="svd", rank_multiple=multiple, exclude=("patch",))
        induced = copy.deepcopy(lorita)
        collapse(induced, budget, rank_multiple=multiple)
        pca = copy.deepcopy(normal)
        compress(pca, calib, budget, method="pca", rank_multiple=multiple, exclude=("patch",))
        rows.append((budget, accuracy(svd, x_test, y_test), accuracy(induced, x_test, y_test), accuracy(pca, x_test, y_test)))
    return rows


def table(name: str, rows) -> str:
    lines = [f"### {name}", "", "| linear params kept | (a) train → SVD | (b) LoRITa → SVD | (c) train → feature PCA |",
             "|---|---|---|---|"]
    for budget, a, b, c in rows:
        label = "dense (no truncation)" if budget == "dense" else f"{budget:.2f}"
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {'' if c is None else f'{c:.3f}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few epochs, one budget (a smoke test)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    epochs = (2, 1) if args.quick else (40, 30)
    budgets = BUDGETS[:1] if args.quick else BUDGETS
    text = table("MLP 64→256→256→10", run(MLP, epochs[0], budgets)) + "\n" + table(
        "ViT (2×2 patches, dim 64, 2 blocks)", run(ViT, epochs[1], budgets))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# LoRITa on scikit-learn digits (test accuracy, 450 test images)\n\n"
                            "Produced by `python examples/lorita_digits.py --out docs/lorita_digits.md`.\n\n" + text)


if __name__ == "__main__":
    main()
