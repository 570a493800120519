"""SiT and refiner: public checkpoint layout, checkpoint loading, forward-pass contracts."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from flowturbo.models import (
    SIT_CONFIGS,
    CheckpointError,
    SiT,
    VelocityRefiner,
    load_checkpoint,
)
from flowturbo.models.checkpoint import build_from_checkpoint, save_checkpoint
from flowturbo.models.sit import sincos_pos_embed_2d, timestep_embedding

PUBLIC_NAMES = [f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
TINY = dict(input_size=8, in_channels=3, num_classes=10)  # with SiT-Tiny/2: D 64, depth 2


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def public_keys(depth: int) -> set[str]:
    """The parameter names of a public SiT checkpoint, written out independently of the model."""
    keys = {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    for i in range(depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    return keys


def tiny(seed: int = 0, cls: type[SiT] = SiT, **kwargs) -> SiT:
    torch.manual_seed(seed)
    model = cls.from_name("SiT-Tiny/2", **{**TINY, **kwargs})
    # Zero-initialised adaLN/head would make every output 0: randomise everything for the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model.eval()


def inputs(batch: int = 4, channels: int = 3, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------------------
# Layout of the public checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_sizes_have_public_layout(name: str) -> None:
    cfg = SIT_CONFIGS[name]
    with torch.device("meta"):
        model = SiT.from_name(name)
    sd = model.state_dict()
    assert set(sd) == public_keys(cfg["depth"])
    d, p = cfg["hidden_size"], cfg["patch_size"]
    assert sd["x_embedder.proj.weight"].shape == (d, 4, p, p)
    assert sd["pos_embed"].shape == (1, (32 // p) ** 2, d)
    assert sd["final_layer.linear.weight"].shape == (p * p * 8, d)


def test_sit_xl2_exact_shapes_and_parameter_count() -> None:
    with torch.device("meta"):
        model = SiT.from_name("SiT-XL/2")
    sd = model.state_dict()
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["blocks.27.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert sd["blocks.27.attn.qkv.weight"].shape == (3456, 1152)
    assert sd["blocks.27.mlp.fc1.weight"].shape == (4608, 1152)
    assert sd["final_layer.linear.weight"].shape == (32, 1152)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2304, 1152)
    # 28 blocks x 23,905,152 + embedders 3,091,968 (pos_embed 294,912) + head 2,693,408.
    assert n_params(model) == 675_129_632
    assert not model.pos_embed.requires_grad


def test_refiner_from_xl2_is_under_five_percent_of_base() -> None:
    with torch.device("meta"):
        base = SiT.from_name("SiT-XL/2")
        refiner = VelocityRefiner.from_base(base)
    sd = refiner.state_dict()
    assert set(sd) == public_keys(1)
    assert sd["x_embedder.proj.weight"].shape == (1152, 8, 2, 2)
    assert sd["final_layer.linear.weight"].shape == (32, 1152)
    ratio = n_params(refiner) / n_params(base)
    print(
        f"refiner {n_params(refiner) / 1e6:.2f} M vs base {n_params(base) / 1e6:.2f} M: "
        f"{100 * ratio:.2f} %"
    )
    assert n_params(refiner) == 29_708_960
    assert ratio <= 0.05
    with torch.device("meta"):
        named = VelocityRefiner.from_name("SiT-XL/2")  # one block unless depth is given
    assert named.config == refiner.config and len(named.blocks) == 1


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"SiT-XL/2.*SiT-Tiny/2|SiT-Tiny/2.*SiT-XL/2"):
        SiT.from_name("SiT-XXL/2")
    assert {"SiT-Demo/2", "SiT-Tiny/2"} <= set(SIT_CONFIGS)


# ----------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------


def test_timestep_embedding_of_zero_is_cos_then_sin() -> None:
    emb = timestep_embedding(torch.zeros(2), 256)
    assert emb.shape == (2, 256) and emb.dtype == torch.float32
    assert torch.equal(emb, torch.cat([torch.ones(2, 128), torch.zeros(2, 128)], dim=1))
    # t is not rescaled: the highest frequency is 1, so its cos is cos(t).
    t = torch.tensor([0.3])
    assert torch.allclose(timestep_embedding(t, 256)[0, 0], torch.cos(t)[0])
    assert torch.allclose(timestep_embedding(t, 256)[0, 128], torch.sin(t)[0])


def test_pos_embed_first_half_encodes_column() -> None:
    g, d = 4, 16
    emb = sincos_pos_embed_2d(d, g).reshape(g, g, d)  # (row, column, D)
    first, second = emb[..., : d // 2], emb[..., d // 2 :]
    assert torch.equal(first[0], first[3])  # same column, different rows
    assert not torch.equal(first[:, 0], first[:, 3])
    assert torch.equal(second[:, 0], second[:, 3])  # same row, different columns
    # Position 0 of each half: sin(0) = 0 for the first D/4, cos(0) = 1 for the next D/4.
    assert torch.equal(emb[0, 0], torch.tensor(([0.0] * 4 + [1.0] * 4) * 2))
    assert torch.allclose(first[0, 1, 0], torch.sin(torch.tensor(1.0)))  # omega_0 = 1


# ----------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------


def test_fresh_model_predicts_zero_velocity() -> None:
    model = SiT.from_name("SiT-Tiny/2", **TINY)  # adaLN-Zero head starts at zero
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_has_input_channels(learn_sigma: bool) -> None:
    model = tiny(learn_sigma=learn_sigma)
    assert model.final_layer.linear.out_features == 4 * 3 * (2 if learn_sigma else 1)
    x, t, y = inputs()
    assert model(x, t, y).shape == x.shape


def test_learn_sigma_returns_the_first_half_of_the_head() -> None:
    model = tiny()
    x, t, y = inputs()
    with torch.no_grad():
        full = model.unpatchify(
            model.final_layer(
                model.blocks[1](
                    model.blocks[0](
                        model.x_embedder(x) + model.pos_embed,
                        model.t_embedder(t) + model.y_embedder(y),
                    ),
                    model.t_embedder(t) + model.y_embedder(y),
                ),
                model.t_embedder(t) + model.y_embedder(y),
            )
        )
        assert torch.equal(model(x, t, y), full[:, :3])


def test_scalar_time_broadcasts() -> None:
    model = tiny()
    x, _, y = inputs()
    with torch.no_grad():
        expected = model(x, torch.full((4,), 0.25), y)
        assert torch.equal(model(x, torch.tensor(0.25), y), expected)
        assert torch.equal(model(x, 0.25, y), expected)


def test_output_independent_of_batch_composition() -> None:
    model = tiny()
    x, t, y = inputs(batch=6)
    with torch.no_grad():
        full = model(x, t, y)
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
        permuted = model(x[perm], t[perm], y[perm])
        singles = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(permuted, full[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(singles, full, rtol=1e-5, atol=1e-6)


def test_label_dropout_only_in_train_mode() -> None:
    model = tiny(class_dropout_prob=1.0)  # always drop in training
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        assert not torch.equal(model.eval()(x, t, y), model(x, t, null))
        assert torch.equal(model.train()(x, t, y), model.eval()(x, t, null))
        # force_drop_ids drops exactly where asked, in any mode.
        drop = torch.tensor([1, 0, 1, 0])
        mixed = torch.where(drop.bool(), null, y)
        assert torch.equal(model(x, t, y, force_drop_ids=drop), model(x, t, mixed))
    model.eval()
    assert model.y_embedder.embedding_table.num_embeddings == 11
    assert SiT(**TINY, class_dropout_prob=0.0, hidden_size=64, depth=1, num_heads=2).state_dict()[
        "y_embedder.embedding_table.weight"
    ].shape == (10, 64)


def test_refiner_takes_state_and_velocity() -> None:
    base = tiny()
    refiner = tiny(seed=1, cls=VelocityRefiner)
    assert refiner.x_embedder.proj.in_channels == 6 and len(refiner.blocks) == 1
    assert "embed_channels" not in refiner.config
    x, t, y = inputs()
    v = torch.randn_like(x)
    with torch.no_grad():
        dv = refiner(x, t, v, y)
        assert dv.shape == x.shape
        assert torch.equal(dv, SiT.forward(refiner, torch.cat([x, v], dim=1), t, y))
        assert not torch.equal(refiner(x, t, 2 * v, y), dv)
    from_base = VelocityRefiner.from_base(base, mlp_ratio=2.0)
    assert len(from_base.blocks) == 1 and from_base.config["mlp_ratio"] == 2.0
    assert from_base.config["hidden_size"] == 64 and from_base.config["in_channels"] == 3


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="bare"),
        pytest.param(lambda sd: {"ema": sd}, id="ema"),
        pytest.param(
            lambda sd: {
                "model": {k: torch.zeros_like(v) for k, v in sd.items()},
                "ema": sd,
                "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="SiT-XL/2", image_size=256),
            },
            id="train.py",
        ),
        pytest.param(lambda sd: {"model": _prefixed(sd, "module.")}, id="ddp"),
        pytest.param(lambda sd: _prefixed(sd, "_orig_mod."), id="compiled"),
        pytest.param(lambda sd: {"ema": _prefixed(sd, "_orig_mod.module.")}, id="both"),
    ],
)
def test_public_format_round_trip_is_bit_identical(tmp_path, wrap) -> None:
    source = tiny(seed=0)
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(source.state_dict()), path)
    fresh = tiny(seed=7)
    assert load_checkpoint(fresh, path) is fresh
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), source(x, t, y))


def test_explicit_key_and_prefix() -> None:
    source = tiny(seed=0)
    sd = source.state_dict()
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    fresh = load_checkpoint(tiny(seed=3), {"ema": zeros, "model": sd}, key="model")
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values(), strict=True)
    )
    lightning = {
        "state_dict": {**_prefixed(zeros, "net."), **_prefixed(sd, "ema_model.")},
        "epoch": 3,
    }
    fresh = load_checkpoint(tiny(seed=3), lightning, prefix="ema_model.")
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values(), strict=True)
    )
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(tiny(seed=3), lightning)  # prefixes are stripped only when asked
    with pytest.raises(CheckpointError, match="no 'weights'"):
        load_checkpoint(tiny(seed=3), {"ema": sd}, key="weights")


def test_missing_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "nowhere" / "SiT-XL-2-256x256.pt"
    with pytest.raises(FileNotFoundError, match="SiT-XL-2-256x256.pt"):
        load_checkpoint(tiny(), path)


def test_strict_errors_name_missing_unexpected_and_mismatched_keys() -> None:
    sd = tiny().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(32)
    sd["final_layer.linear.weight"] = torch.zeros(12, 64)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny(), sd)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "missing keys" in msg and "blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys" in msg and "blocks.0.attn.q_norm.weight" in msg
    assert "final_layer.linear.weight: model expects (24, 64), checkpoint has (12, 64)" in msg
    assert "learn_sigma" in msg


@pytest.mark.parametrize(
    ("other", "hint"),
    [
        pytest.param(
            dict(num_classes=5),
            "label table has 11 rows, checkpoint 6: check num_classes",
            id="num_classes",
        ),
        pytest.param(
            dict(learn_sigma=False),
            "learn_sigma differs: the head has 24 outputs, the checkpoint 12",
            id="learn_sigma",
        ),
    ],
)
def test_a_checkpoint_differing_only_in_a_shape_is_a_checkpoint_error(other, hint) -> None:
    """The same keys with one shape off: the loader's own error, naming the key and a hint,
    not torch's bare RuntimeError from load_state_dict."""
    with pytest.raises(CheckpointError, match=re.escape(hint)) as info:
        load_checkpoint(tiny(), tiny(**other).state_dict())
    msg = str(info.value)
    assert "shape mismatches" in msg and "missing keys" not in msg and "unexpected" not in msg


def test_error_hints_refiner_and_model_size() -> None:
    with torch.device("meta"):
        base = SiT.from_name("SiT-XL/2")
        refiner = VelocityRefiner.from_base(base)
        small = SiT.from_name("SiT-S/2")
    with pytest.raises(CheckpointError, match="is this a refiner checkpoint") as info:
        load_checkpoint(base, refiner.state_dict())
    assert "wrong depth: the model has 28 blocks, the checkpoint 1" in str(info.value)
    with pytest.raises(CheckpointError, match="is this a base SiT checkpoint"):
        load_checkpoint(refiner, {k: v for k, v in base.state_dict().items()})
    with pytest.raises(CheckpointError, match="hidden 1152 expected, checkpoint has 384"):
        load_checkpoint(base, {"ema": small.state_dict()})
    with pytest.raises(CheckpointError, match="found no weights"):
        load_checkpoint(base, {"args": 1, "epoch": 2})


def test_refiner_loads_public_refiner_layout() -> None:
    # A state dict written out by hand in the public SiT-XL-2-Refiner.pt layout, shrunk to D = 64.
    d, c, p = 64, 4, 2
    g = torch.Generator().manual_seed(0)
    shapes = {
        "pos_embed": (1, 16, d),
        "x_embedder.proj.weight": (d, 2 * c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (11, d),
        "blocks.0.attn.qkv.weight": (3 * d, d),
        "blocks.0.attn.qkv.bias": (3 * d,),
        "blocks.0.attn.proj.weight": (d, d),
        "blocks.0.attn.proj.bias": (d,),
        "blocks.0.mlp.fc1.weight": (4 * d, d),
        "blocks.0.mlp.fc1.bias": (4 * d,),
        "blocks.0.mlp.fc2.weight": (d, 4 * d),
        "blocks.0.mlp.fc2.bias": (d,),
        "blocks.0.adaLN_modulation.1.weight": (6 * d, d),
        "blocks.0.adaLN_modulation.1.bias": (6 * d,),
        "final_layer.linear.weight": (p * p * 2 * c, d),
        "final_layer.linear.bias": (p * p * 2 * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    sd = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
    refiner = VelocityRefiner(
        input_size=8, in_channels=c, hidden_size=d, num_heads=2, num_classes=10
    )
    load_checkpoint(refiner, {"ema": sd})
    assert torch.equal(refiner.x_embedder.proj.weight, sd["x_embedder.proj.weight"])
    x = torch.randn(2, c, 8, 8, generator=g)
    out = refiner.eval()(x, torch.tensor(0.5), torch.randn_like(x), torch.tensor([1, 10]))
    assert out.shape == (2, c, 8, 8) and out.abs().sum() > 0


def test_save_and_build_from_checkpoint(tmp_path) -> None:
    path = tmp_path / "run" / "refiner.pt"
    source = tiny(seed=0, cls=VelocityRefiner)
    save_checkpoint(source, path, step=123)
    assert sorted(p.name for p in path.parent.iterdir()) == ["refiner.pt"]  # no tmp file left
    raw = torch.load(path, weights_only=True)
    assert raw["class"] == "VelocityRefiner" and raw["step"] == 123
    built = build_from_checkpoint(path)
    assert type(built) is VelocityRefiner and built.config == source.config
    assert not built.training and not built.pos_embed.requires_grad
    assert not any(p.is_meta for p in built.parameters())
    x, t, y = inputs()
    v = torch.randn_like(x)
    with torch.no_grad():
        assert torch.equal(built(x, t, v, y), source(x, t, v, y))
    # key= picks the weights of a file with both "ema" (the default) and "model" entries
    ema = tiny(seed=1, cls=VelocityRefiner)
    save_checkpoint(source, tmp_path / "both.pt", ema=ema.state_dict())
    for key, want in ((None, ema), ("model", source)):
        built = build_from_checkpoint(tmp_path / "both.pt", key=key)
        assert torch.equal(built.final_layer.linear.weight, want.final_layer.linear.weight)
    # A public-format file is loaded into a model the caller builds.
    torch.save({"ema": source.state_dict()}, tmp_path / "public.pt")
    with pytest.raises(CheckpointError, match="not written by save_checkpoint"):
        build_from_checkpoint(tmp_path / "public.pt")


def test_meta_model_takes_checkpoint_tensors() -> None:
    source = tiny(seed=0)
    with torch.device("meta"):
        model = SiT.from_name("SiT-Tiny/2", **TINY)
    load_checkpoint(model, source.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), source(x, t, y))


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path) -> None:
    source = tiny(seed=0)
    save_checkpoint(source, tmp_path / "fp32.pt")
    save_checkpoint(source, tmp_path / "fp16.pt", dtype="float16")
    raw = torch.load(tmp_path / "fp16.pt", weights_only=True)
    assert raw["model"]["x_embedder.proj.weight"].dtype == torch.float16
    ratio = (tmp_path / "fp16.pt").stat().st_size / (tmp_path / "fp32.pt").stat().st_size
    assert ratio < 0.6
    built = build_from_checkpoint(tmp_path / "fp16.pt")
    assert all(p.dtype == torch.float32 for p in built.parameters())
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(built(x, t, y), source(x, t, y), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("x", "t", "y", "error", "names"),
    [
        (torch.randn(3, 8, 8), 0.5, torch.tensor([1]), ValueError, "x[None]"),
        (torch.randn(2, 4, 8, 8), 0.5, torch.tensor([1, 2]), ValueError, "(B, 3, 8, 8)"),
        (torch.randn(2, 3, 16, 16), 0.5, torch.tensor([1, 2]), ValueError, "(B, 3, 8, 8)"),
        (torch.randn(2, 3, 8, 8).double(), 0.5, torch.tensor([1, 2]), TypeError, "model.to"),
        (torch.randn(2, 3, 8, 8), torch.rand(2, 1), torch.tensor([1, 2]), ValueError, "t must"),
        (torch.randn(2, 3, 8, 8), 0.5, torch.tensor([1.0, 2.0]), TypeError, "y must hold"),
        (torch.randn(2, 3, 8, 8), 0.5, torch.tensor([[1], [2]]), ValueError, "y must have"),
        (torch.randn(2, 3, 8, 8), 0.5, [1, 2], TypeError, "y must be a tensor"),
        (torch.randn(2, 3, 8, 8), 0.5, torch.tensor([1, 2], device="meta"), ValueError, "y is"),
        (torch.randn(2, 3, 8, 8, device="meta"), 0.5, torch.tensor([1]), ValueError, "model.to"),
    ],
)
def test_misfit_inputs_are_named_before_torch_fails(x, t, y, error, names) -> None:
    model = SiT.from_name("SiT-Tiny/2", **TINY).eval()
    with pytest.raises(error, match=re.escape(names)):
        model(x, t, y)


def test_refiner_names_a_misshaped_velocity() -> None:
    refiner = VelocityRefiner.from_name("SiT-Tiny/2", **TINY).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="velocity v must be shaped like x"):
        refiner(x, 0.5, x[:, :2], torch.tensor([1, 2]))


def test_autocast_state_of_another_dtype_still_runs() -> None:
    model = SiT.from_name("SiT-Tiny/2", **TINY).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        v = model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), 0.5, torch.tensor([1, 2]))
    assert v.shape == (2, 3, 8, 8)


def test_error_hints_named_size_and_prefix() -> None:
    tiny = SiT.from_name("SiT-Tiny/2", **TINY).state_dict()
    with pytest.raises(CheckpointError, match=re.escape("SiT.from_name('SiT-Tiny/2', ...)")):
        load_checkpoint(SiT.from_name("SiT-S/2", **TINY), tiny)
    lightning = {"state_dict": {f"net.{k}": v for k, v in tiny.items()}, "epoch": 3}
    with pytest.raises(CheckpointError, match=re.escape("pass prefix='net.'")) as err:
        load_checkpoint(SiT.from_name("SiT-Tiny/2", **TINY), lightning)
    # each listing ends its own line: "... and N more" is not run into the next section
    lines = str(err.value).splitlines()
    assert all(line.strip().endswith("more") for line in lines if "more" in line)


def test_a_checkpoint_with_ema_and_model_weights_says_which_it_loads(tmp_path, caplog):
    """The public FlowTurbo code reads a checkpoint's "model" weights first, SiT's "ema":
    where a file has both, the loader names its choice and how to take the other."""
    torch.manual_seed(0)
    ema = VelocityRefiner.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    raw = VelocityRefiner.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict()}, tmp_path / "both.pt")
    net = VelocityRefiner.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    with caplog.at_level("WARNING", logger="flowturbo.models.checkpoint"):
        load_checkpoint(net, tmp_path / "both.pt")
    assert "loading 'ema'" in caplog.text and "refiner_arch.key=model" in caplog.text
    assert torch.equal(net.final_layer.linear.weight, ema.final_layer.linear.weight)
    caplog.clear()  # a SiT train.py checkpoint holds both too, and its "ema" is right: no word
    base = SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    torch.save({"model": base.state_dict(), "ema": base.state_dict()}, tmp_path / "sit.pt")
    with caplog.at_level("WARNING", logger="flowturbo.models.checkpoint"):
        load_checkpoint(base, tmp_path / "sit.pt")
    assert caplog.text == ""
    load_checkpoint(net, tmp_path / "both.pt", key="model")
    assert torch.equal(net.final_layer.linear.weight, raw.final_layer.linear.weight)
    # evaluate.py and generate.py: model.refiner_arch.key
    from flowturbo.eval.networks import _load_refiner

    arch = {"name": "SiT-Tiny/2", "input_size": 8, "in_channels": 1, "num_classes": 3}
    loaded = _load_refiner(str(tmp_path / "both.pt"), {**arch, "key": "model"})
    assert torch.equal(loaded.final_layer.linear.weight, raw.final_layer.linear.weight)
