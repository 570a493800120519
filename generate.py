"""Generate, edit or inpaint images with one sampler schedule: how a chosen schedule is deployed.

    python generate.py experiment=demo_generate                       # 100 digits, CPU
    python generate.py experiment=demo_generate task=inpaint input=demo:val num_images=50
    python generate.py experiment=demo_generate task=edit input=demo:val labels=7
    python generate.py experiment=demo_generate pick.sweep=sweeps/demo_sweep pick.max_fid=40
    python generate.py experiment=sit_xl_generate model.base_ckpt=SiT-XL-2-256x256.pt \\
        model.refiner_ckpt=SiT-XL-2-Refiner.pt vae=sd-vae-ft-ema   # 50,000 images + .npz, GPUs

Images go to ``generated/<name>/<sampler>/images/`` (one PNG each, written atomically; a rerun
skips the existing ones, so an interrupted job resumes), with ``grid.png``, ``job.json`` and,
with ``npz=true``, ``samples.npz`` for ADM's evaluation suite. Settings: conf/generate.yaml.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> dict:
    from flowturbo.generate import generate_images

    return generate_images(cfg)


if __name__ == "__main__":
    main()
