"""Output that goes to a log file (a sweep, CI, SLURM) is not a terminal: the progress bar must not redraw
on every batch there, yet it still shows progress."""
from conftest import run_script


def test_progress_in_a_log_file_is_plain_lines_not_a_bar(tmp_path):
    # Steps slower than tqdm's own 0.1 s redraw throttle (the benchmark's model, random init), 40 in one epoch.
    proc = run_script("train.py", ["model=fmnist_clip", "model.pretrained=null", "dataset=synthetic", "shots=16",
                                   "batch_size=2", "trainer.max_steps=40", "eval_zeroshot=false",
                                   "dataset.datamodule.image_size=32", "dataset.datamodule.test_per_class=2",
                                   "trainer.enable_progress_bar=true", f"hydra.run.dir={tmp_path}"])
    out = proc.stdout + proc.stderr
    # a bar's redraws (80 for 40 batches with Lightning's bar, measured) are gone; progress is still reported
    assert out.count("Epoch 0") == 0 and "\r" not in out
    assert "step 40/40 (100%)" in out and "testing: 3 eval sets" in out
