"""A first look at normlab: train the same small MLP on scikit-learn's digits with and without
batch norm, and show that normlab's layer is a drop-in for torch's.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

import normlab


def make_model(norm: str) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    width_in = 64
    for width in (100, 100):
        layers += [torch.nn.Linear(width_in, width), normlab.get_norm(norm, width), torch.nn.Sigmoid()]
        width_in = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(width_in, 10))


def train(norm: str, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    torch.manual_seed(0)
    model = make_model(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 1400, (60,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x[1400:]).argmax(1) == y[1400:]).float().mean().item()


def main() -> None:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x[:1400].mean(0)) / (x[:1400].std(0) + 1e-6)
    y = torch.tensor(data.target)
    for norm in ("none", "batch"):
        print(f"norm={norm:5s}  test accuracy after 300 steps: {train(norm, x, y):.3f}")
    ours, theirs = normlab.BatchNorm2d(64), torch.nn.BatchNorm2d(64)
    ours.load_state_dict(theirs.state_dict())
    sample = torch.randn(8, 64, 7, 7)
    print("normlab.BatchNorm2d == torch.nn.BatchNorm2d:", torch.allclose(ours(sample), theirs(sample), atol=1e-6))


if __name__ == "__main__":
    main()
