"""Write the refiner's trajectory cache: the frozen base's ODE solutions as webdataset shards.

    python cache_trajectories.py                                    # demo base, CPU
    python cache_trajectories.py cache=imagenet cache.base.path=SiT-XL-2-256x256.pt \\
        trainer=gpu out_dir=/data/trajectories/sit_xl                # all GPUs of the node

Resumable: re-running the same command skips the shards already written.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="cache_trajectories")
def main(cfg: DictConfig) -> dict:
    from flowturbo.train import cache_trajectories

    return cache_trajectories(cfg)


if __name__ == "__main__":
    main()
