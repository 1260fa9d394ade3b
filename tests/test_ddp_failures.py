"""Failures under DDP stop every rank: a rank that raised alone would leave the others waiting in an
all-reduce until the process group times out (30 minutes by default)."""
import subprocess
import sys
import textwrap

from conftest import ROOT

SCRIPT = textwrap.dedent('''
    import sys
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from saft.app import CONF_DIR, run
    from saft.app.module import CLIPClassifier

    class NaNOnRankOne(CLIPClassifier):
        def loss(self, batch, reduction="mean"):
            loss = super().loss(batch, reduction)
            return loss * float("nan") if self.global_rank == 1 and self.global_step == 2 else loss

    if __name__ == "__main__":
        out = sys.argv[1]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", return_hydra_config=True, overrides=[
                "model=tiny", "dataset=synthetic", "method=full_ft", "shots=4", "batch_size=4",
                "dataset.datamodule.test_per_class=2", f"hydra.run.dir={out}"])
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = out
        HydraConfig.instance().set_config(cfg)
        datamodule, module = run.build(cfg)
        module.__class__ = NaNOnRankOne
        trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=6, logger=False,
                             enable_progress_bar=False, enable_checkpointing=False, default_root_dir=out)
        try:
            trainer.fit(module, datamodule=datamodule)
        except Exception as e:
            print("STOPPED:", type(e).__name__, str(e).splitlines()[-1][:300])
            sys.exit(3)
        print("FINISHED")
''')


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "nan_on_rank_one.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env={"PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
                                                       "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "the training loss became non-finite" in proc.stdout + proc.stderr
