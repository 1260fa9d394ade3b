"""train.py and eval.py as a user runs them: subprocesses, real configs, files on disk."""
import json
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import FAST, changed_entries, checkpoint, ckpt_masks, ckpt_params, compose_cfg, read_results, run_script
from saft.app import run
from saft.delta import state_checksum
from saft.select import select_mask

QUICK = ["model=tiny", "dataset=synthetic", "trainer.enable_progress_bar=false", "dataset.datamodule.test_per_class=5",
         "dataset.datamodule.train_per_class=8"]
SCHEMA = {"method", "model", "dataset", "shots", "seed", "sparsity", "num_params", "num_trainable",
          "num_changed", "metrics", "id", "ood", "ood_mean_top1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The issue's own command line, once for the module."""
    out = tmp_path_factory.mktemp("run") / "saft"
    run_script("train.py", ["dataset=synthetic", "model=tiny", "method=saft", "sparsity=0.001", "shots=4", "seed=1",
                            "trainer.max_steps=20", "logger=csv", f"hydra.run.dir={out}", *QUICK])
    return out


def test_training_run_writes_results_delta_checkpoints_and_split(trained):
    results = read_results(trained)
    assert SCHEMA <= set(results)
    assert results["id"] == "photo" and results["ood"] == ["sketch", "negative"]
    assert results["ood_mean_top1"] == pytest.approx(sum(results["metrics"][n]["top1"] for n in results["ood"]) / 2)
    assert all(0 <= m["top1"] <= 100 and m["n"] == 30 for m in results["metrics"].values())
    ckpt = checkpoint(trained)
    assert ckpt["global_step"] == 20
    split = json.loads((trained / "split.json").read_text())
    assert len(split["train"]) == 6 * 4 and len(split["val"]) == 6 * 4
    # base + delta == the trained model, and the delta only touches the mask
    tensors = load_file(str(trained / "delta.safetensors"))
    final, masks = ckpt_params(ckpt), ckpt_masks(ckpt)
    from saft.app.clip import load_clip
    base = {n: p.detach().clone() for n, p in load_clip("saft-tiny", None, 0)[0].named_parameters()}
    names = {k.rsplit(".", 1)[0] for k in tensors}
    assert set(tensors) == {f"{n}.{s}" for n in names for s in ("idx", "val")}
    assert names == set(changed_entries(base, final))
    for n in names:
        idx = tensors[f"{n}.idx"]
        assert idx.dtype == torch.int64 and torch.isin(idx, masks[n]).all()
        base[n].view(-1)[idx] = tensors[f"{n}.val"]
    assert all(torch.equal(base[n], final[n]) for n in final)
    assert results["num_changed"] == sum(tensors[f"{n}.idx"].numel() for n in names) <= results["num_trainable"]


def test_eval_of_a_run_reproduces_its_metrics_exactly(trained, tmp_path):
    run_script("eval.py", [f"run_dir={trained}", f"hydra.run.dir={tmp_path / 'e'}"])
    trained_results, evaluated = read_results(trained), read_results(tmp_path / "e")
    assert evaluated["metrics"] == trained_results["metrics"]
    # The weights evaluated are the trained ones bit for bit (a partly applied delta would differ) ...
    final = {n[len("model."):]: t for n, t in checkpoint(trained)["state_dict"].items() if n.startswith("model.")}
    assert evaluated["weights_sha256"] == trained_results["weights_sha256"] == state_checksum(final)
    # ... and both name the base they started from, which the delta was made against
    from saft.app.clip import load_clip
    base = state_checksum(load_clip("saft-tiny", None, 0)[0].state_dict())
    assert evaluated["base_sha256"] == trained_results["base_sha256"] == base != trained_results["weights_sha256"]
    assert trained_results["num_changed"] > 0
    for key in ("method", "model", "num_trainable", "num_changed", "shots", "seed"):
        assert evaluated[key] == trained_results[key]


def test_eval_of_a_run_accepts_other_data_overrides(trained, tmp_path):
    run_script("eval.py", [f"run_dir={trained}", "dataset=synthetic", "dataset.datamodule.test_per_class=2",
                           f"hydra.run.dir={tmp_path / 'e'}"])
    assert all(m["n"] == 12 for m in read_results(tmp_path / "e")["metrics"].values())


def test_eval_without_run_dir_is_zero_shot(trained, tmp_path):
    run_script("eval.py", [f"hydra.run.dir={tmp_path / 'z'}", *QUICK])
    zs = read_results(tmp_path / "z")
    assert zs["method"] == "zeroshot" and zs["num_changed"] == zs["num_trainable"] == 0
    assert zs["metrics"] != read_results(trained)["metrics"]
    assert zs["weights_sha256"] != read_results(trained)["weights_sha256"]
    assert zs["base_sha256"] == zs["weights_sha256"] == read_results(trained)["base_sha256"]


def test_multirun_over_methods_with_max_epochs_and_wandb_offline(tmp_path):
    run_script("train.py", ["-m", "method=full_ft_text,random_mask,zeroshot", "shots=4", "trainer.max_epochs=2",
                            "logger=wandb", f"hydra.sweep.dir={tmp_path}", *QUICK],
               env={"WANDB_MODE": "offline"})
    runs = {read_results(p.parent)["method"]: p.parent for p in tmp_path.glob("*/results.json")}
    assert set(runs) == {"full_ft_text", "random_mask", "zeroshot"}
    assert checkpoint(runs["full_ft_text"])["global_step"] == 2  # 24 images, batch 32: one step per epoch
    wandb_runs = [list((d / "wandb").glob("offline-run-*")) for d in runs.values()]
    assert all(len(w) == 1 for w in wandb_runs)  # one wandb run per job
    assert len({w[0].name for w in wandb_runs}) == 3
    assert (runs["random_mask"] / "mask_blocks.png").is_file()  # logged to wandb for masked runs
    full, rnd = read_results(runs["full_ft_text"]), read_results(runs["random_mask"])
    assert full["num_changed"] > 100 * rnd["num_trainable"] >= 100 * rnd["num_changed"]


def test_ddp_on_two_cpu_processes_keeps_masks_identical_and_frozen(tmp_path):
    """sum_abs is a sum over examples: 2 ranks sharding the data, at one batch size, select what one process
    selects at another batch size."""
    out = tmp_path / "ddp"
    proc = run_script("train.py", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "shots=4",
                                   "trainer.max_steps=4", "sparsity=0.01", "method.mask.score=sum_abs",
                                   "eval_batch_size=5", f"hydra.run.dir={out}", *QUICK])
    lines = (proc.stdout + proc.stderr).splitlines()  # both ranks print to the same console

    def fingerprints(what):
        return {rank: [ln.split("sha256 ")[1] for ln in lines if f"rank {rank}: {what}" in ln] for rank in (0, 1)}
    for what in ("mask of", "trained weights"):
        per_rank = fingerprints(what)
        assert len(per_rank[0]) == len(per_rank[1]) == 1 and per_rank[0] == per_rank[1], what
    results = read_results(out)
    for rank in (0, 1):  # sparse gradients: DDP leaves the masked tensors alone, their k values are reduced
        assert any(f"rank {rank}: DDP reduces 0 dense tensors; the" in ln and
                   f"tensors' {results['num_trainable']} gradient values" in ln for ln in lines), rank
    assert all(m["n"] == 30 for m in results["metrics"].values())  # each test image counted once
    ckpt = checkpoint(out)
    cfg = compose_cfg(tmp_path / "one", ["shots=4", "sparsity=0.01", *QUICK])
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    single = select_mask(module.model, datamodule.mask_dataloader(), lambda _, b: module.per_example_loss(b),
                         sparsity=0.01, score="sum_abs")
    ddp_masks = ckpt_masks(ckpt)
    same = sum(torch.isin(ddp_masks[n], single[n]).sum().item() for n in ddp_masks if n in single)
    assert sum(i.numel() for i in ddp_masks.values()) == results["num_trainable"]
    assert same >= results["num_trainable"] - 2  # at most a float near-tie at the threshold swaps
    from saft.app.clip import load_clip
    base = {n: p.detach() for n, p in load_clip("saft-tiny", None, 0)[0].named_parameters()}
    changed, masks = changed_entries(base, ckpt_params(ckpt)), ckpt_masks(ckpt)
    assert 0 < sum(i.numel() for i in changed.values()) <= results["num_trainable"]
    assert all(torch.isin(idx, masks[n]).all() for n, idx in changed.items())


@pytest.mark.parametrize("args, message", [
    (["sparsity=2"], "sparsity=2 must be a number in (0, 1]"),
    (["sparsity=0"], "sparsity=0 must be a number in (0, 1]"),
    (["shots=0"], "shots=0 must be a positive integer"),
    (["shots=2.5"], "shots=2.5 must be a positive integer"),
    (["model.pretrained=/no/such/file.pt"], "is not a file"),
    (["model.name=NoSuchArch"], "unknown open_clip architecture"),
])
def test_bad_input_gets_one_clear_message(tmp_path, args, message):
    proc = run_script("train.py", [*QUICK, *args, f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_finished_run_is_never_overwritten(trained, tmp_path):
    before = (trained / "results.json").read_bytes()
    for extra in ([], [f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"]):
        proc = run_script("train.py", [*QUICK, f"hydra.run.dir={trained}", *extra], check=False)
        assert proc.returncode == 2 and "already holds finished results" in proc.stderr
    assert (trained / "results.json").read_bytes() == before


def test_eval_uses_the_runs_saved_config_and_records_what_it_used(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    saved = OmegaConf.load(copy / ".hydra" / "config.yaml")
    saved.dataset.datamodule.test_per_class = 3  # as if conf/ had changed since the run
    OmegaConf.save(saved, copy / ".hydra" / "config.yaml")
    run_script("eval.py", [f"run_dir={copy}", "eval_batch_size=7", f"hydra.run.dir={tmp_path / 'e'}"])
    assert all(m["n"] == 18 for m in read_results(tmp_path / "e")["metrics"].values())
    used = OmegaConf.load(tmp_path / "e" / ".hydra" / "config.yaml")
    assert used.method.name == "saft" and used.shots == 4 and used.eval_batch_size == 7


def test_eval_refuses_what_is_not_a_run_and_model_or_method_overrides(trained, tmp_path):
    proc = run_script("eval.py", [f"run_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'e'}"], check=False)
    assert proc.returncode == 2 and "is not a finished training run" in proc.stderr
    for bad in ("model=vit_b16", "++model.force_quick_gelu=true", "method=full_ft"):
        proc = run_script("eval.py", [f"run_dir={trained}", bad, f"hydra.run.dir={tmp_path / 'f'}"], check=False)
        assert proc.returncode == 2 and "the delta belongs to the run's base model and method" in proc.stderr, bad


def test_multirun_with_relaunched_ddp_is_refused(tmp_path):
    proc = run_script("train.py", ["-m", *QUICK, "seed=1,2", "trainer=ddp", "trainer.accelerator=cpu",
                                   f"hydra.sweep.dir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "ddp_spawn" in proc.stderr
    assert not list(tmp_path.glob("**/results.json"))


def test_missing_checkpoint_to_resume_from_is_named(tmp_path):
    proc = run_script("train.py", [*QUICK, f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'r'}"],
                      check=False)
    assert proc.returncode == 2 and "nope.ckpt is not a file" in proc.stderr


def test_wise_ft_blends_a_run_with_its_base_exactly_at_the_ends(trained, tmp_path):
    """alpha=1 is the run and alpha=0 the zero-shot model, bit for bit; in between only masked entries move."""
    for alpha in ("1", "0", "0.5"):
        run_script("eval.py", [f"run_dir={trained}", f"wise_alpha={alpha}", f"hydra.run.dir={tmp_path / alpha}"])
    run, one, zero, half = (read_results(d) for d in (trained, tmp_path / "1", tmp_path / "0", tmp_path / "0.5"))
    assert one["metrics"] == run["metrics"] and one["weights_sha256"] == run["weights_sha256"]
    assert zero["metrics"] == run["zeroshot_metrics"] and zero["num_changed"] == 0
    from saft.app.clip import load_clip
    assert zero["weights_sha256"] == state_checksum(load_clip("saft-tiny", None, 0)[0].state_dict())
    assert half["wise_alpha"] == 0.5 and half["weights_sha256"] not in (run["weights_sha256"], zero["weights_sha256"])
    assert 0 < half["num_changed"] <= run["num_changed"]
    proc = run_script("eval.py", [f"run_dir={trained}", "wise_alpha=1.5", f"hydra.run.dir={tmp_path / 'bad'}"],
                      check=False)
    assert proc.returncode == 2 and "wise_alpha=1.5 must be null or a number in [0, 1]" in proc.stderr


def test_a_log_gets_plain_progress_lines_not_a_redrawn_bar(tmp_path):
    """stdout is a pipe here, as in SLURM or CI: one line per log_every_n_steps steps, with step/total, loss, lr,
    samples/s and ETA, and none of a bar's carriage returns or cursor escapes."""
    args = [a for a in FAST if "enable_progress_bar" not in a]
    proc = run_script("train.py", [*args, "trainer.log_every_n_steps=2", f"hydra.run.dir={tmp_path}"])
    printed = proc.stdout + proc.stderr
    assert "\r" not in printed and "\x1b[" not in printed
    progress = [line for line in printed.splitlines() if "saft.app.progress" in line]
    lines = [line for line in progress if "] - step " in line]
    assert [re.search(r"step (\d+)/6", line).group(1) for line in lines] == ["2", "4", "6"]
    # each test (the zero-shot reference, the final one) says when it starts and ends
    assert sum("testing: 3 eval sets" in line for line in progress) == 2
    assert sum(re.search(r"tested in \d+:\d\d:\d\d$", line) is not None for line in progress) == 2
    for line in lines:
        assert re.search(r"train/loss [\d.]+ \| lr [\d.]+e[+-]\d+ \| [\d.]+ samples/s \| ETA \d+:\d\d:\d\d$", line), line
    assert max(len(line) for line in printed.splitlines()) < 400
    assert progress == [line for line in (tmp_path / "train.log").read_text().splitlines() if "saft.app.progress" in line]


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_describes_the_app_its_groups_and_the_everyday_commands(script):
    printed = run_script(script, ["--help"]).stdout
    assert printed.startswith(f"saft {script}: ")
    groups = dict(line.split(": ", 1) for line in printed.splitlines() if line.split(": ")[0] in ("method", "dataset"))
    assert {"saft", "full_ft", "flyp", "lp_ft"} <= set(groups["method"].split(", "))  # read from conf/, not listed
    assert "fmnist_styles" in groups["dataset"].split(", ")
    for command in ("python train.py -m", "hydra.sweep.dir=<its dir> finished=skip", "python eval.py run_dir=",
                    "python -m saft.report"):
        assert command in printed


def test_wandb_runs_a_dashboard_can_filter_group_and_compare(tmp_path):
    """Read back from the offline runs themselves (tests/wandb_records.py): names and groups, the summary, Lightning's
    lr and throughput, the artifact, an eval run's config, and one wandb run per job across a requeue."""
    from wandb_records import offline_runs, read_run
    env = {"WANDB_MODE": "offline"}
    sweep = tmp_path / "sweep"
    run_script("train.py", ["-m", *FAST, "method=saft", "lr_scale=1,3", "trainer.max_steps=12",
                            "trainer.log_every_n_steps=2", "logger=wandb", f"hydra.sweep.dir={sweep}"], env=env)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    runs = [read_run(offline_runs(job)[0]) for job in jobs]
    assert [r["name"].rsplit("_", 1)[0] for r in runs] == ["lr_scale-1", "lr_scale-3"]  # what the sweep varies
    assert {r["group"] for r in runs} == {"adhoc_sweep"} and {r["job_type"] for r in runs} == {"train"}
    for job, logged in zip(jobs, runs):
        results, summary = read_results(job), {k: json.loads(v) for k, v in logged["summary"].items()}
        assert summary["test/id/top1"] == results["metrics"]["photo"]["top1"]
        assert summary["test/ood_mean/top1"] == pytest.approx(results["ood_mean_top1"])
        assert summary["zeroshot/id/top1"] == results["zeroshot_metrics"]["photo"]["top1"]
        assert summary["gain/id/top1"] == pytest.approx(summary["test/id/top1"] - summary["zeroshot/id/top1"])
        assert (summary["num_trainable"], summary["weights_sha256"]) == (results["num_trainable"],
                                                                         results["weights_sha256"])
        # the zero-shot test before training is logged under its own prefix, never as the run's test
        tested = [json.loads(h["test/photo/top1"]) for h in logged["history"] if "test/photo/top1" in h]
        assert {json.loads(h["trainer/global_step"]) for h in logged["history"] if "test/photo/top1" in h} == {12}
        assert any("zeroshot/photo/top1" in h for h in logged["history"]) or results["zeroshot_from"] == "cache"
        assert tested and all(t == pytest.approx(results["metrics"]["photo"]["top1"]) for t in tested)  # float32 logs
        assert any("train/lr/pg1" in h for h in logged["history"])
        assert any("train/device/samples_per_sec" in h for h in logged["history"])
        assert not [k for h in logged["history"] for k in h if k.startswith("test/") and not k.endswith("/top1")]
        (artifact,) = logged["artifacts"]
        assert artifact["name"] == f"train-{results['identity_hash'][:16]}" and artifact["type"] == "train"
        assert {"results.json", "delta.safetensors"} <= set(artifact["files"])
    run_script("eval.py", [f"run_dir={jobs[1]}", "wise_alpha=0.5", "logger=wandb", "trainer.enable_progress_bar=false",
                           f"hydra.run.dir={tmp_path / 'eval'}"], env=env)
    evaluation = read_run(offline_runs(tmp_path / "eval")[0])
    assert evaluation["job_type"] == "eval" and "_wise0.5_" in evaluation["name"]
    assert json.loads(evaluation["config"]["wise_alpha"]) == 0.5 and evaluation["name"] != runs[1]["name"]
    assert [a["name"].split("-")[0] for a in evaluation["artifacts"]] == ["eval"]  # never the training run's
    (jobs[0] / "results.json").unlink()  # as if killed during the final test: the requeue logs into the same run
    run_script("train.py", ["-m", *FAST, "method=saft", "lr_scale=1,3", "trainer.max_steps=12", "finished=skip",
                            "trainer.log_every_n_steps=2", "logger=wandb", f"hydra.sweep.dir={sweep}"], env=env)
    attempts = offline_runs(jobs[0])
    assert len(attempts) == 2 and {read_run(a)["id"] for a in attempts} == {runs[0]["id"]}
