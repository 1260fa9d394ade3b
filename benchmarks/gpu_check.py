"""The GPU check: full FT vs SAFT on ViT-B/16 in bf16-mixed at a realistic batch, on JPEG folders.

    python benchmarks/gpu_check.py                      # on a CUDA machine; about 2-5 minutes
    python benchmarks/gpu_check.py --batch 256 --json gpu.json

It writes a miniature ImageNet of JPEGs (CoOp's layout, ``--classes`` classes at 500x375 px) to a temporary folder,
then runs ``benchmarks/efficiency.py`` there: ViT-B/16 (random init: nothing is downloaded), each method in its own
process, step time (the second epoch, CUDA-synchronised), peak ``torch.cuda.max_memory_allocated``, and evaluation
images/s of the whole test loop (JPEG decoding in the default DataLoader workers) and of the model alone.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_imagenet(data_dir: Path, classes: int, train: int, val: int, size=(500, 375), seed: int = 0) -> None:
    """classnames.txt plus images/{train,val}/<wnid>/*.JPEG: smooth random pictures, so that JPEG files and their
    decoding cost about what photographs of that size do."""
    from datamodules.imagenet import WNIDS
    rng = np.random.default_rng(seed)
    root = data_dir / "imagenet"
    wnids = WNIDS[:classes]
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    for split, n in (("train", train), ("val", val)):
        for w in wnids:
            folder = root / "images" / split / w
            folder.mkdir(parents=True)
            for i in range(n):
                low = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
                Image.fromarray(low).resize(size, Image.BICUBIC).save(folder / f"{w}_{i}.JPEG", quality=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--val", type=int, default=32, help="test images per class (the ID test set)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (the second is timed)")
    parser.add_argument("--model", default="vit_b16", choices=["vit_b16", "tiny"])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test of this script)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    import torch
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU "
                 "machine, or add --cpu for a smoke test")
    if (args.shots * args.classes) % args.batch:
        sys.exit(f"gpu_check: --shots x --classes ({args.shots * args.classes}) must be a multiple of --batch")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # Training draws shots per class and validation min(shots, 4) more from the train folders.
        write_imagenet(Path(tmp), args.classes, args.shots + 4, args.val)
        print(f"wrote {args.classes} x ({args.shots + 4} + {args.val}) JPEGs in {time.perf_counter() - start:.0f} s")
        steps = args.epochs * args.shots * args.classes // args.batch
        cmd = [sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--model", args.model,
               "--batch", str(args.batch), "--shots", str(args.shots), "--classes", str(args.classes),
               "--steps", str(steps), "--imagenet", tmp, "--precision", args.precision,
               "--accelerator", "cpu" if args.cpu else "gpu", *(["--json", args.json] if args.json else [])]
        if torch.cuda.is_available() and not args.cpu:
            print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
        code = subprocess.call(cmd)
    print(f"gpu_check: {time.perf_counter() - start:.0f} s in all")
    sys.exit(code)


if __name__ == "__main__":
    main()
