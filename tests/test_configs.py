import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from flowturbo.models import SiT, VelocityRefiner, build_from_checkpoint
from flowturbo.train import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
ALL_EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))
# experiments named *_sweep are evaluation sweeps (evaluate.yaml), *_generate are generate.py
# jobs (generate.yaml); the others train (train.yaml)
SWEEPS = [name for name in ALL_EXPERIMENTS if name.endswith("_sweep")]
GENERATE = [name for name in ALL_EXPERIMENTS if name.endswith("_generate")]
EXPERIMENTS = sorted(set(ALL_EXPERIMENTS) - set(SWEEPS) - set(GENERATE))
# values a user must supply (???), filled for composition
REQUIRED = {
    "sit_refiner": ["model.base.path=base.pt", "data.train_shards=/data/train"],
    "own_refiner": [
        "model.base.path=base.pt",
        "model.base.factory=own_flow.load_reversed_sit",
        "data.train_shards=/data/train",
    ],
    "sit_xl_generate": [
        "model.base_ckpt=SiT-XL-2-256x256.pt",
        "model.refiner_ckpt=SiT-XL-2-Refiner.pt",
        "vae=sd-vae-ft-ema",
    ],
    "sit_xl_sweep": [
        "model.base_ckpt=SiT-XL-2-256x256.pt",
        "model.refiner_ckpt=SiT-XL-2-Refiner.pt",
        "vae=sd-vae-ft-ema",
        "fid.inception_weights=weights-inception-2015-12-05-6726825d.pth",
        "fid.reference=VIRTUAL_imagenet256_labeled.npz",
    ],
}


def cfg_for(overrides, run_dir, config_name="train"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_every_experiment_is_tested():
    assert set(EXPERIMENTS) >= {"demo_base", "demo_refiner", "sit_refiner"}
    assert set(SWEEPS) >= {"demo_sweep", "sit_xl_sweep"}
    assert set(GENERATE) >= {"demo_generate", "sit_xl_generate"}


@pytest.mark.parametrize("name", GENERATE)
def test_generate_experiment_composes_with_generate_yaml(name, tmp_path):
    from flowturbo.config import check_required
    from flowturbo.eval.entries import parse_entry

    cfg = cfg_for([f"experiment={name}", *REQUIRED.get(name, [])], tmp_path, "generate")
    assert cfg.name == f"{name}_sample" and cfg.out_dir == f"generated/{name}_sample"
    check_required(cfg, f"python generate.py experiment={name}")
    assert parse_entry(cfg.sampler.schedule).family == "flowturbo"
    if name == "sit_xl_generate":
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.strategy == "ddp"
        assert cfg.num_images == 50000 and cfg.npz and cfg.sampler.cfg_scale == 1.5
    if name == "demo_generate":  # the shipped models: runs here, no downloads
        from flowturbo.generate import generate_images

        with open_dict(cfg):
            cfg.out_dir, cfg.num_images, cfg.progress = str(tmp_path / "out"), 8, False
        summary = generate_images(cfg)
        assert summary == {
            "task": "sample",
            "sampler": "H1P3R3",
            "images": 8,
            "written": 8,
            "skipped_inputs": 0,
            "out_dir": str(tmp_path / "out" / "H1P3R3"),
            "grid": str(tmp_path / "out" / "H1P3R3" / "grid.png"),
        }
        assert (tmp_path / "out" / "H1P3R3" / "grid.png").is_file()


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_experiment_composes_with_evaluate_yaml(name, tmp_path):
    from flowturbo.config import check_required
    from flowturbo.eval.entries import sweep_entries
    from flowturbo.eval.summary import FAMILIES

    cfg = cfg_for([f"experiment={name}", *REQUIRED.get(name, [])], tmp_path, "evaluate")
    assert cfg.name == name and cfg.out_dir == f"sweeps/{name}"  # stable: shared by jobs
    entries = sweep_entries(cfg)  # every schedule and baseline parses
    assert {"heun", "flowturbo"} <= {e.family for e in entries}
    one = cfg_for([f"experiment={name}", "sampler.schedule=euler:16"], tmp_path, "evaluate")
    assert [e.label for e in sweep_entries(one)] == ["euler:16"]
    if name == "sit_xl_sweep":
        check_required(cfg, "python evaluate.py experiment=sit_xl_sweep")
        assert [e.label for e in entries][:4] == ["H8", "H11", "H15", "H24"]
        assert cfg.sampler.cfg_scale == 1.5 and cfg.sampler.dtype == "bfloat16"
        assert cfg.fid.num_images == 50000 and cfg.latency.batch == 8
    if name == "demo_sweep":
        assert cfg.fid.extractor == "flowturbo-digits" and cfg.vae is None
        assert Path(cfg.fid.weights).is_file()  # the shipped digit classifier
        families = {e.family for e in entries}
        assert families == set(FAMILIES) - {"other"}  # every family of sampler


@pytest.mark.parametrize("name", ["sit_xl_sweep", "sit_xl_generate"])
def test_the_readmes_own_model_overrides_replace_the_sit_architecture(name, tmp_path):
    own = "+model.base_arch={factory: mypkg.flows.load_model, in_channels: 4, time_scale: 1000}"
    config = "evaluate" if name.endswith("_sweep") else "generate"
    overrides = [f"experiment={name}", *REQUIRED[name], "~model.base_arch", own]
    cfg = cfg_for(overrides, tmp_path, config)
    assert dict(cfg.model.base_arch) == {
        "factory": "mypkg.flows.load_model",
        "in_channels": 4,
        "time_scale": 1000,
    }


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name, tmp_path):
    cfg = cfg_for([f"experiment={name}", *REQUIRED.get(name, [])], tmp_path)
    assert cfg.name == name
    module = instantiate(cfg.model)  # no I/O: the frozen base is loaded in setup()
    on_cpu = {}
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        on_cpu = {"accelerator": "cpu", "devices": 1, "strategy": "auto"}  # same config, CPU
    assert instantiate(cfg.trainer, logger=False, **on_cpu).max_steps == cfg.trainer.max_steps
    if name == "sit_refiner":
        assert isinstance(module.refiner, VelocityRefiner)
        assert module.refiner.config["hidden_size"] == 1152 and len(module.refiner.blocks) == 1
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy == "ddp"
    if name == "own_refiner":  # the base's block reaches load_frozen_base's factory path
        assert module.base_factory.keywords["factory"] == "own_flow.load_reversed_sit"
        assert module.base_factory.keywords["time"] == "noise_to_data"


@pytest.mark.parametrize(
    "name, override, error",
    [
        ("demo_base", "model.optimizer.lr=-1", r"model.optimizer.lr must be a number > 0, got -1"),
        ("demo_refiner", "model.optimizer.lr=0", r"model.optimizer.lr must be a number > 0"),
        ("demo_refiner", "model.optimizer.lr=abc", r"model.optimizer.lr .* got 'abc'"),
        ("demo_base", "model.optimizer.weight_decay=-0.1", r"weight_decay must be a number >= 0"),
        ("demo_refiner", "model.warmup_steps=-5", r"model.warmup_steps must be .* got -5"),
        ("demo_base", "model.warmup_steps=2.5", r"model.warmup_steps must be a whole number"),
        ("demo_refiner", "model.dt_max=0", r"model.dt_max must be in \(0, 1\], got 0"),
        ("demo_refiner", "model.dt_max=1.5", r"model.dt_max must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_training_settings_are_named_when_the_model_is_built(name, override, error, tmp_path):
    """A bad learning rate was torch's "Invalid learning rate" after the base was loaded, and a
    negative warm-up or dt_max <= 0 passed the constructor: each now names its setting."""
    cfg = cfg_for([f"experiment={name}", override], tmp_path)
    with pytest.raises(Exception, match=error):
        instantiate(cfg.model)


def test_required_values_are_marked_missing(tmp_path):
    from omegaconf.errors import MissingMandatoryValue

    cfg = cfg_for(["experiment=sit_refiner"], tmp_path)
    with pytest.raises(MissingMandatoryValue, match="path"):
        _ = cfg.model.base.path


@pytest.mark.parametrize(
    ("config_name", "experiment", "override", "error"),
    [
        ("train", "demo_refiner", "resume=no", r"resume=no: Hydra reads yes/no/on/off as text"),
        ("evaluate", "demo_sweep", "summarize_only=off", r"summarize_only=off: .* true or false"),
        ("generate", "demo_generate", "npz=No", r"npz=No: .* true or false"),
        (
            "generate",
            "demo_generate",
            "+sampler.schedul=H8",
            r"\+sampler\.schedul=H8 adds a setting that nothing reads, and sampler has "
            r"schedule: did you mean sampler\.schedule=H8 \(without the \+\)\?",
        ),
        ("train", "demo_refiner", "+trainer.strategy=ddp_spawn", None),  # a Trainer argument
        ("evaluate", "demo_sweep", "+fid.inception_weights=w.pth", None),  # a new key
    ],
)
def test_switches_written_as_text_and_added_typos_are_refused(
    config_name, experiment, override, error, tmp_path
):
    """``resume=no`` resumed (the text "no" is true), and ``+sampler.schedul=H8``, which Hydra
    suggests for the typo, ran the default schedule: both silently did what was not asked."""
    from flowturbo.config import check_config

    cfg = cfg_for([f"experiment={experiment}", override], tmp_path, config_name)
    if error is None:
        check_config(cfg, f"python {config_name}.py")
    else:
        with pytest.raises(ValueError, match=error):
            check_config(cfg, f"python {config_name}.py")


@pytest.mark.parametrize("name", SWEEPS)
def test_a_summary_only_job_needs_none_of_the_missing_values(name, tmp_path):
    """``python evaluate.py experiment=sit_xl_sweep summarize_only=true`` (the README's merge
    step) gives no checkpoint: the checks of the config must read past its ``???`` values."""
    from flowturbo.config import check_config, check_text_booleans

    cfg = cfg_for([f"experiment={name}", "summarize_only=true"], tmp_path, "evaluate")
    check_config(cfg, "python evaluate.py", required=False)
    check_text_booleans(OmegaConf.create({"items": ["???", "${a}"], "a": 1}))  # a list too


@pytest.mark.parametrize("name", ALL_EXPERIMENTS)
def test_every_value_an_experiment_marks_missing_is_asked_for(name, tmp_path):
    """A ``???`` in an experiment merged onto a value of the main config is no ``???`` any more
    (OmegaConf keeps the value): sit_xl_generate's refiner and VAE were silently null."""
    from omegaconf import OmegaConf

    from flowturbo.config import check_required, command_line

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif value == "???":
                yield f"{prefix}{key}"

    raw = OmegaConf.load(Path(CONF, "experiment", f"{name}.yaml"))
    marked = set(walk(OmegaConf.to_container(raw, resolve=False)))
    config = "evaluate" if name in SWEEPS else "generate" if name in GENERATE else "train"
    cfg = cfg_for([f"experiment={name}"], tmp_path, config)
    script = f"{config}.py"
    if not marked:
        check_required(cfg, command_line(script))
        return
    with pytest.raises(ValueError, match=f"python {script} experiment={name} ") as e:
        check_required(cfg, command_line(script))
    listed = str(e.value).split("must be given: ")[1].split(". ")[0].split(", ")
    assert marked <= set(listed), (marked, listed)


def test_missing_values_are_named_in_one_readable_error(tmp_path):
    cfg = cfg_for(["experiment=sit_refiner"], tmp_path)
    with pytest.raises(
        ValueError,
        match=r"model\.base\.path.*data\.train_shards|data\.train_shards.*model\.base\.path",
    ):
        train(cfg)


def test_slurm_launcher_config_requeues_into_the_same_checkpoint_folder(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = cfg_for(
        ["experiment=sit_refiner", "hydra/launcher=slurm", *REQUIRED["sit_refiner"]], tmp_path
    )
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    assert launcher.nodes == cfg.trainer.num_nodes
    assert launcher.tasks_per_node == launcher.gpus_per_node
    assert cfg.ckpt_dir == "checkpoints/sit_refiner"  # not under the timestamped run folder
    assert cfg.callbacks.checkpoint_on_signal.signum == "SIGUSR2"


@pytest.mark.parametrize(
    ("config_name", "experiment", "launcher", "nodes", "tasks"),
    [
        ("evaluate", "sit_xl_sweep", "slurm_one_gpu", 1, 1),  # one GPU per schedule's job
        ("generate", "demo_generate", "slurm", 1, 8),  # trainer=cpu has no num_nodes
        ("generate", "sit_xl_generate", "slurm", 1, 8),  # trainer=gpu: its num_nodes
    ],
)
def test_slurm_launchers_resolve_for_every_entry_point(
    config_name, experiment, launcher, nodes, tasks, tmp_path
):
    """The launcher settings resolve (submitit reads them all) for jobs without Lightning
    trainer settings too, and evaluate.py's jobs each ask for one task on one GPU."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = [f"experiment={experiment}", f"hydra/launcher={launcher}"]
    cfg = cfg_for([*overrides, *REQUIRED.get(experiment, [])], tmp_path, config_name)
    settings = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert "SlurmLauncher" in settings["_target_"] and settings["max_num_timeout"] > 0
    assert (settings["nodes"], settings["tasks_per_node"]) == (nodes, tasks)
    assert settings["gpus_per_node"] == tasks


def test_each_job_of_a_multirun_gets_its_own_checkpoint_folder(tmp_path):
    """A single run keeps checkpoints/<name>; jobs of a multirun get a folder each, named after
    their overrides (not resume, not the export settings), or the ckpt_dir given."""

    def ckpt_dir(*overrides, multirun=True):
        mode = ["hydra.mode=MULTIRUN"] if multirun else []
        cfg = cfg_for(["experiment=demo_refiner", *overrides, *mode], tmp_path)
        assert cfg.callbacks.checkpoint.dirpath == cfg.callbacks.checkpoint_on_signal.dirpath
        assert cfg.callbacks.checkpoint.dirpath == cfg.ckpt_dir
        return cfg.ckpt_dir

    try:
        job = ckpt_dir("model.optimizer.lr=1e-4")
        assert job == "checkpoints/demo_refiner/experiment=demo_refiner,model.optimizer.lr=1e-4"
        assert ckpt_dir("model.optimizer.lr=5e-5") != job  # the sweep's other job
        # a requeue or a relaunch of the sweep finds it again, with or without these
        assert ckpt_dir("resume=false", "model.optimizer.lr=1e-4", "export_dtype=float16") == job
        assert ckpt_dir("ckpt_dir=/scratch/mine", "model.optimizer.lr=1e-4") == "/scratch/mine"
        # a path among the overrides: still one folder under checkpoints/<name>, its own
        base = ckpt_dir("model.base.path=/data/models/base.pt")
        other = ckpt_dir("model.base.path=/data/models_base.pt")
        assert base.startswith("checkpoints/demo_refiner/experiment=demo_refiner,model.base.path=")
        assert base != other and base.count("/") == other.count("/") == 2
        long = ckpt_dir(*[f"+model.extra_{i}={'x' * 20}" for i in range(20)])
        assert len(Path(long).name) <= 200 and long.count("/") == 2
    finally:  # the tests after this one compose single runs
        assert ckpt_dir("model.optimizer.lr=1e-4", multirun=False) == "checkpoints/demo_refiner"


def test_a_multirun_that_would_start_its_own_ddp_ranks_is_refused(tmp_path, monkeypatch):
    """Lightning's strategy=ddp starts ranks by running the command again, -m included: every
    rank would run the whole sweep. ddp_spawn, one device and single runs are fine."""
    import lightning as L

    from flowturbo.config import check_ddp_launch

    monkeypatch.chdir(tmp_path)
    ddp = ["trainer.devices=2", "+trainer.strategy=ddp"]
    try:
        cfg = cfg_for(["experiment=demo_base", *TINY, *ddp, "hydra.mode=MULTIRUN"], tmp_path)
        with pytest.raises(ValueError, match=r"multirun \(-m\) cannot start 2 DDP processes"):
            train(cfg)
        for strategy, devices in (("ddp_spawn", 2), ("ddp", 1)):
            check_ddp_launch(L.Trainer(accelerator="cpu", devices=devices, strategy=strategy))
        # a SLURM task (hydra/launcher=slurm, one task per GPU) is a rank already: it was
        # refused too, so the README's SLURM command could not train on two GPUs
        slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "train"}
        slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
        slurm |= {"SLURM_JOB_ID": "7", "SLURM_NODELIST": "localhost"}
        for key, value in slurm.items():
            monkeypatch.setenv(key, value)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp")
        assert trainer.strategy.cluster_environment.creates_processes_externally
        check_ddp_launch(trainer)
    finally:  # the tests after this one compose single runs
        cfg_for(["experiment=demo_base", *TINY], tmp_path)
    check_ddp_launch(L.Trainer(accelerator="cpu", devices=2, strategy="ddp"))  # single run


def test_missing_settings_are_described_by_kind():
    from omegaconf import OmegaConf

    from flowturbo.config import check_required

    cfg = OmegaConf.create({"model": {"base": {"path": "???", "factory": "???"}}})
    with pytest.raises(ValueError) as err:
        check_required(cfg, "python train.py experiment=own_refiner")
    message = str(err.value)
    assert "must be given: model.base.factory, model.base.path. " in message
    assert "model.base.factory: a function's dotted path (e.g. mypkg.flows.load_model)" in message
    assert "each is a path" not in message
    with pytest.raises(ValueError) as err:
        check_required(OmegaConf.create({"vae": "???"}), "python generate.py")
    assert "dotted path" not in str(err.value) and "each is a path" not in str(err.value)


def test_trainer_gpu_without_cuda_is_refused_in_words(tmp_path, monkeypatch):
    from flowturbo.config import check_accelerator

    cfg = cfg_for(["experiment=sit_refiner", *REQUIRED["sit_refiner"], "trainer=gpu"], tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        check_accelerator(cfg.trainer)
    assert str(err.value) == (
        "trainer.accelerator=gpu but no CUDA GPU is visible here (torch.cuda.is_available() is "
        "False): use trainer=cpu, or run on a GPU node"
    )
    check_accelerator(cfg_for(["experiment=demo_base", "trainer=cpu"], tmp_path).trainer)
    # each entry point checks before it loads anything (no base checkpoint exists here)
    from flowturbo.generate import generate_images
    from flowturbo.train import cache_trajectories, train

    nowhere = str(tmp_path / "no-base.pt")
    for fn, config, overrides in [
        (train, "train", ["experiment=demo_refiner", f"model.base.path={nowhere}"]),
        (cache_trajectories, "cache_trajectories", [f"cache.base.path={nowhere}"]),
        (generate_images, "generate", ["experiment=demo_generate", f"model.base_ckpt={nowhere}"]),
    ]:
        with pytest.raises(ValueError, match="trainer.accelerator=gpu but no CUDA GPU"):
            fn(cfg_for([*overrides, "trainer=gpu"], tmp_path, config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_accelerator(cfg.trainer)


TINY = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "data.steps_per_epoch=3",
    "data.batch_size=4",
    "data.val_samples=4",
    "data.num_workers=0",
    "data.shuffle_buffer=10",
    "logger.wandb=null",
    "callbacks.checkpoint.every_n_train_steps=3",
]


def tiny_net(kind):
    return [f"model.{kind}.name=SiT-Tiny/2"]


def test_a_run_ending_between_checkpoints_saves_and_validates_its_last_step(tmp_path, monkeypatch):
    """With max_steps not a multiple of the checkpoint interval, last.ckpt stayed at the last
    interval: the same command run again trained the last steps anew and rewrote the exported
    weights (other noise), and the stored metrics were of the last validation's earlier step."""
    monkeypatch.setenv("FLOWTURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    overrides = ["experiment=demo_base", *TINY, *tiny_net("net"), "trainer.max_steps=5"]
    first = train(cfg_for(overrides, tmp_path / "run1"))
    folder = tmp_path / "checkpoints" / "demo_base"
    last = torch.load(folder / "last.ckpt", weights_only=False)
    exported = torch.load(folder / "net.pt", weights_only=False)
    assert last["global_step"] == exported["step"] == 5
    again = train(cfg_for(overrides, tmp_path / "run2"))  # trains nothing, validates step 5
    rerun = torch.load(folder / "net.pt", weights_only=False)
    for key, value in exported["model"].items():
        assert torch.equal(rerun["model"][key], value), key
    for key in ("val/loss", "val/loss_net"):  # the first run's figures were of step 5 too
        assert again[key] == pytest.approx(first[key], rel=1e-6), key
        assert rerun["metrics"][key] == pytest.approx(first[key], rel=1e-6), key


def test_demo_base_then_demo_refiner_run_end_to_end(tmp_path, monkeypatch, caplog):
    """train.py's code path on the real demo data, with a tiny model: base, then refiner."""
    monkeypatch.setenv("FLOWTURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(["experiment=demo_base", *TINY, *tiny_net("net")], tmp_path / "run1")
    with caplog.at_level("INFO", logger="flowturbo.train"):
        train(cfg)
    assert "batch 4 per rank x 1 rank(s) x 1 accumulated = 4 examples" in caplog.text
    base_file = tmp_path / "checkpoints" / "demo_base" / "net.pt"  # demo_base exports net
    base = build_from_checkpoint(base_file)
    assert isinstance(base, SiT) and (tmp_path / "checkpoints/demo_base/last.ckpt").is_file()

    tiny_base = ["model.base.path=checkpoints/demo_base/net.pt"]  # instead of the shipped one
    cfg = cfg_for(
        ["experiment=demo_refiner", *TINY, *tiny_net("refiner"), *tiny_base], tmp_path / "run2"
    )
    metrics = train(cfg)
    refiner = build_from_checkpoint(tmp_path / "checkpoints" / "demo_refiner" / "ema.pt")
    assert isinstance(refiner, VelocityRefiner)
    assert "val/error_ratio" in metrics
    x = torch.randn(2, 1, 32, 32)
    assert refiner(x, torch.rand(2), x, torch.tensor([1, 2])).shape == x.shape

    # the same base as a flow model of one's own (tests/own_flow.py runs it data -> noise):
    # the same validation targets, which only the base and the fixed seeds determine
    own = [
        "name=own_refiner",
        "+model.base.factory=own_flow.load_reversed_sit",
        "+model.base.in_channels=1",
        "+model.base.input_size=32",
        "+model.base.num_classes=10",
        "+model.base.time=data_to_noise",
        "+model.base.time_scale=1000",
        "+model.base.null_label=-1",
    ]
    cfg = cfg_for(
        ["experiment=demo_refiner", *TINY, *tiny_net("refiner"), *tiny_base, *own],
        tmp_path / "run_own",
    )
    own_metrics = train(cfg)
    assert float(own_metrics["val/loss_unrefined"]) == pytest.approx(
        float(metrics["val/loss_unrefined"]), rel=1e-4
    )
    assert (tmp_path / "checkpoints" / "own_refiner" / "ema.pt").is_file()

    # rerunning a finished run trains nothing; its validation is run again, not lost
    refiner_cfg = ["experiment=demo_refiner", *TINY, *tiny_net("refiner"), *tiny_base]
    again = train(cfg_for(refiner_cfg, tmp_path / "run2b"))
    assert again["val/error_ratio"] == pytest.approx(metrics["val/error_ratio"], rel=1e-5)
    ema = torch.load(tmp_path / "checkpoints/demo_refiner/ema.pt", weights_only=False)
    assert ema["metrics"]["val/error_ratio"] == pytest.approx(metrics["val/error_ratio"])

    # another experiment's checkpoint folder is refused in words, before Lightning loads it
    with pytest.raises(ValueError, match="written by another run: .* name=..., or resume=false"):
        train(cfg_for([*refiner_cfg, "name=demo_base"], tmp_path / "run_clash"))
    with pytest.raises(ValueError, match="model.target=trajectory trains from a trajectory"):
        train(cfg_for([*refiner_cfg, "model.target=trajectory"], tmp_path / "run_kind"))
    with pytest.raises(ValueError, match=r"1-channel inputs, .* read as 3-channel .*channels=1"):
        train(cfg_for([*refiner_cfg, "+data.channels=3"], tmp_path / "run_channels"))
    with pytest.raises(ValueError, match="export_dtype must be null .* got 'fp16'"):
        train(cfg_for([*refiner_cfg, "export_dtype=fp16"], tmp_path / "run_dtype"))

    # a rerun resumes from last.ckpt and continues the step count; changed settings are named
    more = ["trainer.max_steps=5", "model.optimizer.lr=0.01"]
    cfg = cfg_for(["experiment=demo_base", *TINY, *tiny_net("net"), *more], tmp_path / "run3")
    train(cfg)
    assert torch.load(base_file, weights_only=False)["step"] == 5
    assert "with 1 setting(s) other than the run that wrote it: model.optimizer.lr" in caplog.text

    # resume=false starts over and replaces last.ckpt: a last-v1.ckpt written beside it (the
    # checkpoint callback's version counter) would be passed over by the next resume
    fresh = ["experiment=demo_base", *TINY, *tiny_net("net"), "resume=false"]
    train(cfg_for(fresh, tmp_path / "run4"))
    ckpts = tmp_path / "checkpoints" / "demo_base"
    assert [p.name for p in ckpts.glob("last*")] == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 3


def test_train_py_runs_under_ddp_spawn(tmp_path, monkeypatch):
    """ddp_spawn (CPU multi-process) pickles the module, and the parent process's trainer never
    sees the step: ema.pt recorded step 0."""
    monkeypatch.setenv("FLOWTURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    ddp = ["trainer.devices=2", "+trainer.strategy=ddp_spawn", "callbacks.sample_grid=null"]
    train(cfg_for(["experiment=demo_refiner", *TINY, *tiny_net("refiner"), *ddp], tmp_path))
    ema = torch.load(tmp_path / "checkpoints/demo_refiner/ema.pt", weights_only=False)
    assert ema["step"] == 3 and "val/error_ratio" in ema["metrics"]


def test_a_multirun_of_train_py_trains_each_job_in_its_own_folder(tmp_path):
    """Two jobs of one sweep: the second trains (not resumes the first's finished last.ckpt)
    and exports its own weights, each in its folder."""
    import subprocess
    import sys

    from flowturbo.lock import RANK_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(FLOWTURBO_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled")
    command = [
        sys.executable,
        str(Path(CONF).parent / "train.py"),
        "-m",
        "experiment=demo_base",
        *TINY,
        *tiny_net("net"),
        "callbacks.sample_grid=null",
        "model.optimizer.lr=1e-3,2e-3",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    folders = sorted(p for p in (tmp_path / "checkpoints" / "demo_base").iterdir() if p.is_dir())
    assert len(folders) == 2, folders
    nets = []
    for folder in folders:
        assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 3
        nets.append(torch.load(folder / "net.pt", weights_only=False))
        assert nets[-1]["step"] == 3
    first, second = (n["model"] for n in nets)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # two runs, two results
    assert not (tmp_path / "checkpoints" / "demo_base" / "last.ckpt").exists()


def test_a_checkpoint_folder_another_run_holds_is_refused(tmp_path, monkeypatch):
    from flowturbo.lock import RANK_VARIABLES, FolderInUseError, folder_lock

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLOWTURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(["experiment=demo_refiner", *TINY, *tiny_net("refiner")], tmp_path / "run")
    folder = Path("checkpoints/demo_refiner")
    with folder_lock(folder, what_to_do="x"), pytest.raises(FolderInUseError) as refused:
        train(cfg)
    assert str(refused.value).startswith(f"{folder} is in use by another run (pid {os.getpid()}")
    assert str(refused.value).endswith("give this run another name=... or ckpt_dir=...")
    assert sorted(p.name for p in folder.iterdir()) == ["run.lock"]  # no wandb_id, no ckpt


@pytest.mark.parametrize("callbacks", [[], ["~callbacks"]])
def test_training_always_seeds_each_rank_and_saves_its_final_step(tmp_path, callbacks):
    """Without SeedEachRank every DDP rank would draw the same noise (tests/test_data.py);
    without FinalCheckpoint a run could end after its last.ckpt."""
    from flowturbo.lit.callbacks import FinalCheckpoint, SeedEachRank
    from flowturbo.train import make_callbacks

    cfg = cfg_for(["experiment=demo_refiner", "seed=7", *callbacks], tmp_path)
    made = make_callbacks(cfg)
    (seeds,) = [c for c in made if isinstance(c, SeedEachRank)]
    (final,) = [c for c in made if isinstance(c, FinalCheckpoint)]
    assert len(made) == len(cfg.get("callbacks") or {}) + 3 and seeds.seed == 7
    assert final.path.parent == Path(cfg.ckpt_dir)


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    """A requeued or rerun job logs into the same W&B run (ECOSYSTEM.md: pin the id)."""
    from omegaconf import OmegaConf

    from flowturbo.train import wandb_run_id

    cfg = OmegaConf.create({"ckpt_dir": str(tmp_path / "ckpt"), "resume": True})
    first = wandb_run_id(cfg)  # a fresh start: a new id, kept beside the checkpoints
    assert (tmp_path / "ckpt" / "wandb_id").read_text().strip() == first
    assert wandb_run_id(cfg) != first  # still no last.ckpt: nothing to continue
    (tmp_path / "ckpt" / "last.ckpt").write_bytes(b"")
    kept = (tmp_path / "ckpt" / "wandb_id").read_text().strip()
    assert wandb_run_id(cfg) == kept  # resuming: the same run
    cfg.resume = False
    assert wandb_run_id(cfg) != kept  # starting over: a new run


def test_the_default_wandb_logger_is_offline_and_continues_its_run(tmp_path, monkeypatch):
    """The README's first command logs to W&B offline: the logger must build from the config
    (tests otherwise run with W&B disabled) and carry the run id kept for resuming."""
    pytest.importorskip("wandb")  # a dependency, but absent on the GPU machine (GPU.md)
    from lightning.pytorch.loggers import WandbLogger

    from flowturbo.train import make_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(["experiment=demo_refiner"], tmp_path / "run")
    (wandb,) = [lg for lg in make_loggers(cfg) if isinstance(lg, WandbLogger)]
    run_id = (tmp_path / "checkpoints" / "demo_refiner" / "wandb_id").read_text().strip()
    assert wandb._wandb_init["id"] == run_id and wandb._wandb_init["resume"] == "allow"
    assert wandb._offline
