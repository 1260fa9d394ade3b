"""What the mask's scoring pass costs per score: |Σg| (one backward per batch) against Σ|g| and Σg² (per-example
gradients by torch.func, and one backward per example as before), on the CLIP app's model and data, side by side
in one process (each pass run --repeat times after a warm-up; the median is printed), and the matrix-product
FLOPs each pass performs (torch.utils.flop_counter, one more run of it).

    python benchmarks/scoring_cost.py --model fmnist_clip --shots 16
    python benchmarks/scoring_cost.py --prompts context    # class prompts at the full context (before trim_prompts)
"""
import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist_clip", choices=["tiny", "fmnist_clip", "vit_b16"])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="scoring batch size (eval_batch_size)")
    parser.add_argument("--include", default="", help="regex of the eligible tensors (e.g. ^visual: the image tower)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompts", choices=["trimmed", "context"], default="trimmed",
                        help="class prompts at their own length (model.trim_prompts) or the context's")
    args = parser.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from saft.app import CONF_DIR, run
    from saft.select import eligible_parameters, gradient_sums

    overrides = [f"model={args.model}", "model.pretrained=null", "dataset=synthetic", f"shots={args.shots}",
                 f"eval_batch_size={args.batch}", "dataset.datamodule.image_size=32",
                 f"model.trim_prompts={args.prompts == 'trimmed'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides + ["hydra.run.dir=/tmp/saft-scoring-cost"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/saft-scoring-cost"
    HydraConfig.instance().set_config(cfg)
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    params = eligible_parameters(module.model, [args.include] if args.include else [])
    batches = list(datamodule.mask_dataloader())
    n = sum(len(b[1]) for b in batches)
    loss = lambda _, b: module.per_example_loss(b)  # noqa: E731
    seconds, flops = {}, {}
    passes = [("abs_sum", "abs_sum", None), ("sum_abs", "sum_abs", None), ("fisher", "fisher", None),
              ("sum_abs, a backward per example", "sum_abs", 0), ("fisher, a backward per example", "fisher", 0)]
    for label, score, chunk in passes:
        kwargs = {} if chunk is None else {"chunk_bytes": chunk}
        times = []
        for _ in range(args.repeat + 1):  # the first is a warm-up
            start = time.perf_counter()
            gradient_sums(module.model, params, batches, loss, score, **kwargs)
            times.append(time.perf_counter() - start)
        seconds[label] = statistics.median(times[1:])
        if chunk is None:
            with FlopCounterMode(display=False) as counter:
                gradient_sums(module.model, params, batches, loss, score)
            flops[label] = counter.get_total_flops()
    eligible_mb = sum(p.numel() for p in params.values()) * 4 / 2**20
    print(f"{args.model}: {n} examples, scoring batch {args.batch}, {torch.get_num_threads()} threads, "
          f"eligible: {args.include or 'every trained tensor'}, prompts {args.prompts}, "
          f"{eligible_mb:.0f} MB of eligible fp32 entries (the sums and each backward's gradients: 2x that)")
    for score, s in seconds.items():
        work = (f"; {flops[score] / 1e9:.2f} GFLOP of matrix products, {flops[score] / flops['abs_sum']:.2f}x, "
                f"{flops[score] / s / 1e9:.0f} GFLOP/s" if score in flops else "")
        print(f"  {score:32s} {s:7.3f} s  ({1000 * s / n:.2f} ms per example, {s / seconds['abs_sum']:.2f}x abs_sum"
              f"{work})")
    print(f"  peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
