"""Train a base flow model or a FlowTurbo velocity refiner.

    python train.py experiment=demo_base          # CPU, no downloads
    python train.py experiment=demo_refiner
    python train.py experiment=sit_refiner model.base.path=SiT-XL-2-256x256.pt \
        data.train_shards=...
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    from flowturbo.train import train

    return train(cfg)


if __name__ == "__main__":
    main()
