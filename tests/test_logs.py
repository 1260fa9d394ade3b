"""Output that goes to a log file (a sweep, CI, SLURM) is not a terminal: the progress bar must not redraw
on every batch there, yet it still shows progress."""
from conftest import run_script


def test_progress_in_a_log_file_redraws_far_less_than_once_per_batch(tmp_path):
    # Steps slower than tqdm's own 0.1 s redraw throttle (the benchmark's model, random init), 40 in one epoch.
    proc = run_script("train.py", ["model=fmnist_clip", "model.pretrained=null", "dataset=synthetic", "shots=16",
                                   "batch_size=2", "trainer.max_steps=40", "eval_zeroshot=false",
                                   "dataset.datamodule.image_size=32", "dataset.datamodule.test_per_class=2",
                                   "trainer.enable_progress_bar=true", f"hydra.run.dir={tmp_path}"])
    out = proc.stdout + proc.stderr  # Lightning's bar writes to stdout
    redraws = out.count("Epoch 0")  # each redraw of the training bar repeats its label
    assert "Testing" in out and redraws >= 1  # progress is still reported
    assert redraws < 15, redraws  # 40 training batches: 80 redraws without the fix (measured)
