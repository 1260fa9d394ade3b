"""Evaluate a finished run (run_dir=DIR: base model + DIR/delta.safetensors) or zero-shot CLIP."""
import hydra
from omegaconf import DictConfig

from saft.app.run import evaluate, reports_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
