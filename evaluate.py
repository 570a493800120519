"""Sample a grid from trained checkpoints with one schedule and measure its latency.

    python evaluate.py base_ckpt=checkpoints/demo_base/ema.pt schedule=H8
    python evaluate.py refiner_ckpt=checkpoints/demo_refiner/ema.pt schedule=H1P5R3 compile=true

Writes samples.png and result.json (schedule, NFE, ms/img, settings) to the run folder.
The FID-versus-latency sweep over many schedules is not built yet.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from flowturbo.eval.grid import sample_grid

    return sample_grid(cfg)


if __name__ == "__main__":
    main()
