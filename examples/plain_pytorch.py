"""SAFT on a plain PyTorch model and training loop (no Lightning, no CLIP): runs on a CPU in seconds.

A small conv net is first trained on one labelling of random 8x8 images ("pre-training"), then fine-tuned
with SAFT on a shifted task (dark blobs instead of bright ones): only 5% of its entries, chosen by gradient magnitude, may change. The
fine-tuned model is saved as a sparse delta against its base and rebuilt from it bit for bit.

    python examples/plain_pytorch.py [--out DIR]
"""
import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import saft


def make_task(n: int, shift: float, seed: int):
    """Images whose label is the quadrant holding the brightest blob; ``shift`` moves every blob."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    for i, label in enumerate(labels.tolist()):
        row, col = 4 * (label // 2) + 1, 4 * (label % 2) + 1
        images[i, 0, row:row + 2, col:col + 2] += 2.0 + shift
    return images, labels


def batches(images, labels, size):
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size)]


def per_example_loss(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels, reduction="none")


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return 100 * (model(images).argmax(1) == labels).float().mean().item()


def train(model, optimizer, data, epochs):
    model.train()
    for _ in range(epochs):
        for batch in data:
            optimizer.zero_grad()
            per_example_loss(model, batch).mean().backward()
            optimizer.step()


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 4))
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches(*make_task(512, 0.0, seed=1), 64), 3)
    base = {n: t.clone() for n, t in model.state_dict().items()}

    x, y = make_task(64, -3.0, seed=2)  # the downstream task: dark blobs, 64 examples
    test_x, test_y = make_task(512, -3.0, seed=3)
    before = accuracy(model, test_x, test_y)

    # The three lines: score every entry on the downstream data, keep the top 5%, train only those.
    mask = saft.select_mask(model, batches(x, y, 16), per_example_loss, sparsity=0.05)
    optimizer = saft.MaskedAdamW.from_mask(model, mask, lr=1e-2, weight_decay=0.1)
    train(model, optimizer, batches(x, y, 16), 20)

    delta = saft.compute_delta(base, model.state_dict())
    saft.save_delta(out / "delta.safetensors", delta, base=base)
    loaded, metadata = saft.load_delta(out / "delta.safetensors")
    rebuilt = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 4))
    rebuilt.load_state_dict(base)
    saft.apply_delta(rebuilt, loaded, base_sha256=metadata["base_sha256"])

    k = sum(i.numel() for i in mask.values())
    print(f"entries: {sum(p.numel() for p in model.parameters())}, selected k={k}, changed {saft.num_changed(delta)}")
    print(f"test accuracy on the shifted task: {before:.1f}% before, {accuracy(model, test_x, test_y):.1f}% after")
    print(f"rebuilt from base + delta bit for bit: "
          f"{saft.state_checksum(rebuilt.state_dict()) == saft.state_checksum(model.state_dict())}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where delta.safetensors goes (default: a temp dir)")
    args = parser.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        main(args.out)
