"""SAFT in a Lightning training loop on a LightningModule of your own (not the CLIP app): CPU, seconds.

What ``saft.SparseMaskCallback`` needs from the LightningModule:
- ``per_example_loss(batch)`` returning one loss per example (the mask scores are sums over examples);
- ``configure_optimizers`` returning ``saft.MaskedAdamW`` (the callback gives it the mask at fit start);
- scoring data: a ``mask_dataloader(rank, world_size)`` method on the module or datamodule, or else the
  ``train_dataloader()`` is used.
The mask is part of the callback's checkpoint state: a resumed run keeps it.

    python examples/lightning_module.py [--out DIR]
"""
import argparse
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import saft


def sequences(n: int, seed: int):
    """Token sequences labelled by which of 3 marker tokens occurs most often."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 20, (n, 12), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    for i, label in enumerate(labels.tolist()):
        tokens[i, torch.randperm(12, generator=gen)[:4]] = label
    return tokens, labels


class SequenceClassifier(pl.LightningModule):
    def __init__(self, sparsity: float = 0.02, lr: float = 3e-3):
        super().__init__()
        torch.manual_seed(0)  # a fixed random init stands in for pre-trained weights
        self.embed = nn.Embedding(20, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.lr = lr
        self.data = sequences(96, seed=1)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    def per_example_loss(self, batch):
        tokens, labels = batch
        return F.cross_entropy(self(tokens), labels, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return saft.MaskedAdamW(self.parameters(), lr=self.lr, weight_decay=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*self.data), batch_size=16, shuffle=True)

    def mask_dataloader(self, rank: int = 0, world_size: int = 1):
        tokens, labels = self.data
        return DataLoader(TensorDataset(tokens[rank::world_size], labels[rank::world_size]), batch_size=32)


def accuracy(module, tokens, labels) -> float:
    with torch.no_grad():
        return 100 * (module(tokens).argmax(1) == labels).float().mean().item()


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = SequenceClassifier()
    base = {n: t.clone() for n, t in module.state_dict().items()}
    test = sequences(512, seed=2)
    before = accuracy(module, *test)
    callback = saft.SparseMaskCallback(sparsity=0.02, score="abs_sum")
    trainer = pl.Trainer(max_epochs=15, accelerator="cpu", callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))
    trainer.fit(module)
    delta = saft.compute_delta(base, module.state_dict())
    print(f"entries: {sum(p.numel() for p in module.parameters())}, selected k={callback.stats['mask/k']}, "
          f"changed {saft.num_changed(delta)}")
    print(f"test accuracy: {before:.1f}% before, {accuracy(module, *test):.1f}% after")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Lightning's output folder (default: a temp dir)")
    args = parser.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        main(args.out)
