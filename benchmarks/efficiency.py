"""SAFT vs full fine-tuning: step time, peak memory, mask cost, artifact size, evaluation throughput.

    python benchmarks/efficiency.py --model tiny
    python benchmarks/efficiency.py --model vit_b16 --batch 8 --shots 4 --steps 6   # ViT-B/16-sized, random init
    python benchmarks/efficiency.py --scope per_tensor --selection random --json out.json   # other masks
    python benchmarks/efficiency.py --attention stock    # before saft.app.attention (both methods)
    python benchmarks/efficiency.py --prompts context    # training prompts at the full context (before trim_prompts)

Each method trains in its own subprocess (peak memory = that process's max RSS, model included; on a GPU also
torch.cuda.max_memory_allocated), on the same few-shot set (procedural images, or JPEG folders with --imagenet),
batch size and machine, and the script prints the ratios side by side. benchmarks/gpu_check.py runs it on a GPU.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(args) -> dict:
    """Train one method for a few steps; report timings, memory and sizes as JSON."""
    import hydra
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import saft.select
    from saft.app import run
    from saft.callback import SparseMaskCallback

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.imagenet:  # JPEG folders in ImageNet's layout, decoded by the default DataLoader workers
        data = ["dataset=imagenet", f"data_dir={args.imagenet}", "~dataset.datamodule.variant_dirs",
                "dataset.datamodule.templates=simple"]
    else:  # procedural images drawn in the main process
        data = ["dataset=synthetic", "dataset.datamodule.test_per_class=8"]
    device = ["trainer=gpu" if args.accelerator == "gpu" else "trainer=cpu"]
    if args.precision:
        device.append(f"trainer.precision={args.precision}")
    overrides = [f"model={args.model}", "model.pretrained=null", f"method={args.method}", *data, *device,
                 f"shots={args.shots}", f"batch_size={args.batch}", f"eval_batch_size={args.batch}",
                 f"trainer.max_steps={args.steps}",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "trainer.check_val_every_n_epoch=1000", "trainer.gradient_clip_val=1.0",
                 "checkpoint.every_n_train_steps=100000", "logger=csv", "eval_zeroshot=false",
                 f"model.batch_first_attention={args.attention == 'batch_first'}",
                 f"model.trim_prompts={args.prompts == 'trimmed'}", f"hydra.run.dir={out}"]
    if args.method == "saft":
        overrides += [f"method.mask.scope={args.scope}", f"method.mask.selection={args.selection}",
                      f"method.mask.sparse_grads={args.gradients == 'sparse'}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    out.mkdir(parents=True, exist_ok=True)

    timings = {"step": [], "mask": 0.0, "scores": 0.0}
    cuda = args.accelerator == "gpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # a GPU step ends when its kernels do

    class Clock(pl.Callback):
        def on_train_batch_start(self, *a):
            sync()
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            sync()
            timings["step"].append(time.perf_counter() - self.t)

    def timed(method, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            result = method(*a, **k)
            timings[key] = time.perf_counter() - t
            return result
        return wrapper
    SparseMaskCallback._select = timed(SparseMaskCallback._select, "mask")
    saft.select.gradient_sums = timed(saft.select.gradient_sums, "scores")

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pl.seed_everything(1)
    identity = run.run_identity(cfg)
    datamodule, module = run.build(cfg, identity)
    mask_cb = hydra.utils.instantiate(cfg.method.mask) if cfg.method.get("mask") else None
    trainer = run.make_trainer(cfg, [c for c in (mask_cb, Clock()) if c is not None], identity, "train")
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.fit(module, datamodule=datamodule)
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    # Evaluation: the whole test loop vs the model alone on the same images already in memory.
    n_images = sum(len(s.items) for s in datamodule.eval_sets())
    t = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    loop_ips = n_images / (time.perf_counter() - t)
    batches = [(torch.stack([datamodule.eval_transform(s.load(k)) for k, _ in s.items[i:i + args.batch]]), j)
               for j, s in enumerate(datamodule.eval_sets()) for i in range(0, len(s.items), args.batch)]
    module.eval()
    precision = str(trainer.precision)  # the test loop's autocast, for the model alone too
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16 if precision.startswith("bf16")
                              else torch.float16, enabled=precision.endswith("-mixed"))
    with torch.no_grad(), autocast:
        heads = [module.eval_head(j) for j in range(len(datamodule.eval_sets()))]
        sync()
        t = time.perf_counter()
        for images, j in batches:
            module(images.to(module.device), heads[j]).argmax(-1)
        sync()
        alone_ips = n_images / (time.perf_counter() - t)

    result = {"method": args.method, "steps": timings["step"], "mask_s": timings["mask"],
              "scores_s": timings["scores"],
              "steps_per_epoch": len(datamodule.train_dataloader()),
              "rss_start_mb": rss_before, "rss_model_mb": rss_model, "rss_peak_train_mb": rss_train,
              "gpu_peak_mb": gpu_peak,
              "attention": sorted({type(m).__name__ for m in module.model.modules()
                                   if isinstance(m, torch.nn.MultiheadAttention)}),
              "eval_loop_ips": loop_ips, "eval_alone_ips": alone_ips,
              "state_dict_bytes": sum(p.numel() * p.element_size() for p in module.model.parameters())}
    if mask_cb is not None:
        run.write_artifacts(cfg, identity, module, datamodule, mask_cb)
        result["delta_bytes"] = (out / run.DELTA).stat().st_size
        result["k"] = mask_cb.stats["mask/k"]
        result["frozen_tensors"] = sum(1 for p in module.model.parameters() if not p.requires_grad)
        result["tensors"] = sum(1 for _ in module.model.parameters())
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit_b16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="at least two epochs (the second is timed)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--scope", choices=["global", "per_tensor"], default="global", help="SAFT's top-k scope")
    parser.add_argument("--selection", choices=["gradient", "random"], default="gradient", help="SAFT's mask")
    parser.add_argument("--gradients", choices=["sparse", "dense"], default="sparse",
                        help="SAFT's weight gradients: the k entries alone, or dense and masked (method.mask.sparse_grads)")
    parser.add_argument("--attention", choices=["batch_first", "stock"], default="batch_first",
                        help="self-attention of both methods: saft.app.attention (default) or nn.MultiheadAttention's")
    parser.add_argument("--prompts", choices=["trimmed", "context"], default="trimmed",
                        help="training prompts of both methods at their own length (model.trim_prompts) or the context's")
    parser.add_argument("--json", metavar="PATH", help="also write the figures printed, ratios included, to PATH")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--precision", help="Lightning precision, e.g. bf16-mixed (default: the trainer config's)")
    parser.add_argument("--imagenet", metavar="DIR", help="data_dir holding imagenet/ (CoOp's layout) of JPEGs; "
                        "default: procedural images in memory")
    parser.add_argument("--classes", type=int, default=6, help="classes of the data (6 for the procedural images)")
    parser.add_argument("--child", choices=["saft", "full_ft_text"])  # full FT of the towers SAFT masks
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        print("RESULT " + json.dumps(child(args)))
        return

    if (args.shots * args.classes) % args.batch or args.steps < 2 * (args.shots * args.classes // args.batch):
        sys.exit(f"use shots * {args.classes} classes divisible by --batch and --steps >= two epochs, so every step "
                 f"has a full batch and a warm epoch can be timed")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("full_ft_text", "saft"):
            cmd = [sys.executable, __file__, "--child", method, "--out", f"{tmp}/{method}", "--model", args.model,
                   "--batch", str(args.batch), "--shots", str(args.shots), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--scope", args.scope, "--selection", args.selection,
                   "--gradients", args.gradients, "--attention", args.attention, "--prompts", args.prompts,
                   "--accelerator", args.accelerator]
            cmd += (["--precision", args.precision] if args.precision else []) + (
                ["--imagenet", args.imagenet] if args.imagenet else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            results[method] = json.loads(line[len("RESULT "):])
    report(args, results)


def report(args, r):
    ft, saft = r["full_ft_text"], r["saft"]
    spe = saft["steps_per_epoch"]  # the first epoch pays for allocation and lazy init: the second is timed

    def step(x):
        return statistics.median(x["steps"][spe:])
    epoch_s = sum(saft["steps"][spe:2 * spe])
    ft_epoch_s = sum(ft["steps"][spe:2 * spe])
    rows = [
        ("train step time (s, median)", step(ft), step(saft), step(saft) / step(ft), "<= 0.63"),
        ("peak memory (MB, process max RSS)", ft["rss_peak_train_mb"], saft["rss_peak_train_mb"],
         saft["rss_peak_train_mb"] / ft["rss_peak_train_mb"], "<= 0.75"),
        *([("peak GPU memory (MB, torch.cuda.max_memory_allocated)", ft["gpu_peak_mb"], saft["gpu_peak_mb"],
            saft["gpu_peak_mb"] / ft["gpu_peak_mb"], "(info)")] if ft.get("gpu_peak_mb") else []),
        ("training memory above the loaded model (MB)", ft["rss_peak_train_mb"] - ft["rss_model_mb"],
         saft["rss_peak_train_mb"] - saft["rss_model_mb"],
         (saft["rss_peak_train_mb"] - saft["rss_model_mb"]) / (ft["rss_peak_train_mb"] - ft["rss_model_mb"]), "(info)"),
        ("mask computation (s) vs one full-FT epoch (s)", ft_epoch_s, saft["mask_s"], saft["mask_s"] / ft_epoch_s,
         "<= 1.5"),
        ("mask computation (s) vs one SAFT epoch (s)", epoch_s, saft["mask_s"], saft["mask_s"] / epoch_s, "<= 1.5"),
        ("delta file vs fp32 state dict (bytes)", saft["state_dict_bytes"], saft["delta_bytes"],
         saft["delta_bytes"] / saft["state_dict_bytes"], "<= 0.005"),
        ("eval images/s: model alone vs whole loop", saft["eval_alone_ips"], saft["eval_loop_ips"],
         saft["eval_loop_ips"] / saft["eval_alone_ips"], ">= 0.9"),
    ]
    print(f"\nmodel={args.model} batch={args.batch} shots={args.shots} ({args.classes} classes) steps={args.steps} "
          f"threads={args.threads} attention={args.attention} prompts={args.prompts}; SAFT mask {args.selection}/{args.scope}, "
          f"{args.gradients} gradients, "
          f"k={saft['k']}, tensors frozen by the mask: {saft['frozen_tensors']}/{saft['tensors']}")
    print("| measure | full FT (or reference) | SAFT | ratio | target |\n|---|---|---|---|---|")
    for name, a, b, ratio, target in rows:
        print(f"| {name} | {a:.4g} | {b:.4g} | {ratio:.3f} | {target} |")
    print(f"(model loaded, before training: full FT {ft['rss_model_mb']:.0f} MB, SAFT {saft['rss_model_mb']:.0f} MB; "
          f"mask = {saft['scores_s']:.3g} s of gradient pass + {saft['mask_s'] - saft['scores_s']:.3g} s of top-k)")
    if args.json:
        keys = ("step", "peak_rss", *(["peak_gpu"] if ft.get("gpu_peak_mb") else []), "train_rss",
                "mask_vs_ft_epoch", "mask_vs_saft_epoch", "delta", "eval_loop")
        figures = {key: {"full_ft": a, "saft": b, "ratio": ratio} for key, (_, a, b, ratio, _) in zip(keys, rows)}
        Path(args.json).write_text(json.dumps({
            "settings": {k: getattr(args, k) for k in ("model", "batch", "shots", "steps", "threads", "scope",
                                                       "selection", "gradients", "attention", "prompts", "accelerator",
                                                       "precision", "imagenet", "classes")},
            "eval_images_per_s": {"loop": saft["eval_loop_ips"], "model_alone": saft["eval_alone_ips"]},
            "k": saft["k"], "frozen_tensors": saft["frozen_tensors"], "tensors": saft["tensors"],
            "step_ratio": figures["step"]["ratio"], "peak_rss_ratio": figures["peak_rss"]["ratio"],
            "figures": figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
