"""Sweep sampler schedules into FID-versus-latency Pareto fronts (README, "Evaluating").

    python evaluate.py experiment=demo_sweep          # CPU, no downloads, shipped models
    python evaluate.py experiment=demo_sweep fid.num_images=5000 name=demo_sweep_5k
    python evaluate.py experiment=sit_xl_sweep model.base_ckpt=SiT-XL-2-256x256.pt \
        model.refiner_ckpt=SiT-XL-2-Refiner.pt vae=sd-vae-ft-ema \
        fid.inception_weights=weights-inception-2015-12-05-6726825d.pth \
        fid.reference=VIRTUAL_imagenet256_labeled.npz

One job per schedule, all into the same folder, then the merged summary:

    python evaluate.py -m experiment=demo_sweep sampler.schedule=H8,H1P7,H2P4R3
    python evaluate.py experiment=demo_sweep summarize_only=true

For every schedule (or baseline solver, e.g. ``euler:16``): FID, IS and precision/recall of
``fid.num_images`` generated images, the RMS error to a fine reference ODE solution, and ms/img
eager and compiled at ``latency.batch``. Everything goes to ``sweeps/<name>/``: ``rows/`` (one
JSON per schedule; a rerun skips the schedules whose settings did not change), ``grids/``,
``results.json``, ``results.csv``, ``pareto.png``, ``acceleration.json`` (the acceleration of
the fastest FlowTurbo schedule at least as good, at matched FID and at matched reference error,
versus each Heun row and each other baseline; eager vs eager, compiled vs compiled, and for a
latent model with the decode) and ``summary.txt`` (the printed tables). Settings:
conf/evaluate.yaml.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from flowturbo.eval.sweep import run_sweep

    return run_sweep(cfg)


if __name__ == "__main__":
    main()
