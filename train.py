"""Fine-tune CLIP with SAFT or a baseline: python train.py [overrides]. See README.md."""
from typing import Optional

import hydra
from omegaconf import DictConfig

from saft.app.run import objective, reports_user_errors, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@reports_user_errors
def main(cfg: DictConfig) -> Optional[float]:
    return objective(cfg, train(cfg))  # a hyper-parameter search's value (optimized_metric), else None


if __name__ == "__main__":
    main()
