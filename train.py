"""Fine-tune CLIP with SAFT or a baseline: python train.py [overrides]. See README.md."""
import hydra
from omegaconf import DictConfig

from saft.app.run import reports_user_errors, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
