"""A flow model of the user's own (flowturbo.models.FlowModel): conventions, labels, errors.

The commands' own-model paths are tested beside their other tests (test_evaluate.py,
test_generate.py, test_configs.py), with tests/own_flow.py as the user's package.
"""

import pytest
import torch
from own_flow import ReversedMixture, ReversedSiT
from torch import nn

from flowturbo.flow.analytic import GaussianMixtureFlow
from flowturbo.lit import load_frozen_base
from flowturbo.lit.trajectories import _fingerprint
from flowturbo.models import FlowModel, SiT, load_flow_model, save_checkpoint
from flowturbo.sampling import sample

REVERSED = {"time": "data_to_noise", "time_scale": 1000, "null_label": -1}


def tiny_sit() -> SiT:
    torch.manual_seed(0)
    sit = SiT.from_name("SiT-Tiny/4", input_size=32, in_channels=1, num_classes=3)
    with torch.no_grad():
        for p in sit.parameters():
            p.normal_(0, 0.05)
    return sit.eval()


def test_a_flow_run_from_data_to_noise_is_adapted_exactly():
    torch.manual_seed(0)
    flow = GaussianMixtureFlow(torch.randn(3, 2, 4, 4), torch.tensor([0.3, 0.5, 0.2]))
    spec = {"in_channels": 2, "input_size": 4, "conditional": False}
    model = FlowModel(ReversedMixture(flow), time="data_to_noise", **spec)
    x, t = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    torch.testing.assert_close(model(x, t), flow(x, t))
    torch.testing.assert_close(sample(model, x, "H4"), sample(flow, x, "H4"))
    # the convention matters: taken as running noise -> data, the same network is wrong
    wrong = FlowModel(ReversedMixture(flow), time="noise_to_data", **spec)
    assert (wrong(x, t) - flow(x, t)).abs().max() > 0.5


def test_times_reach_the_network_in_float32_when_the_state_is_bf16():
    seen = []

    class Net(nn.Module):
        def forward(self, x, s):
            seen.append(s)
            return torch.zeros_like(x)

    spec = {"in_channels": 1, "input_size": 2, "conditional": False}
    model = FlowModel(Net(), time="data_to_noise", time_scale=1000, **spec)
    x = torch.randn(2, 1, 2, 2, dtype=torch.bfloat16)
    model(x, torch.tensor([0.99, 0.999]))
    torch.testing.assert_close(seen[0], torch.tensor([10.0, 1.0]), rtol=1e-4, atol=1e-4)
    model(x.double(), 0.999)  # a scalar time takes the state's precision, at least float32
    assert seen[1].dtype == torch.float64 and seen[1].shape == (2,)


def test_labels_the_null_class_and_dropped_labels_reach_the_network_as_its_own():
    sit = tiny_sit()
    net = ReversedSiT(sit)
    model = FlowModel(net, in_channels=1, input_size=32, num_classes=3, **REVERSED)
    x, t = torch.randn(4, 1, 32, 32), torch.rand(4)
    y, drop = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 0, 0])  # 3: flowturbo's null
    with torch.no_grad():
        out = model(x, t, y, force_drop_ids=drop)
        expected = sit(x, t, y, force_drop_ids=drop)
    assert net.last_labels.tolist() == [-1, 1, 2, -1]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_the_cache_fingerprint_tells_two_conventions_of_the_same_weights_apart():
    net = ReversedSiT(tiny_sit())
    spec = {"in_channels": 1, "input_size": 32, "num_classes": 3}
    a = FlowModel(net, **spec, **REVERSED)
    assert _fingerprint(a) == _fingerprint(FlowModel(net, **spec, **REVERSED))
    assert _fingerprint(a) != _fingerprint(FlowModel(net, **spec, time_scale=1000))


class TwoHeads(nn.Module):
    def forward(self, x, s):
        return torch.cat([x, x], dim=1)  # a velocity and a variance, say


def test_bad_flow_models_are_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        FlowModel(lambda x, s, y: x, in_channels=1, input_size=4)
    with pytest.raises(ValueError, match="time must be one of"):
        FlowModel(nn.Identity(), in_channels=1, input_size=4, time="backwards")
    heads = FlowModel(TwoHeads(), in_channels=1, input_size=4, conditional=False)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 4, 4\) for input \(2, 1, 4, 4\)"):
        heads(torch.randn(2, 1, 4, 4), torch.rand(2))
    with pytest.raises(ValueError, match="conditional: pass labels"):
        FlowModel(ReversedSiT(tiny_sit()), in_channels=1, input_size=32)(
            torch.randn(1, 1, 32, 32), 0.5
        )

    ckpt = tmp_path / "base.pt"
    save_checkpoint(tiny_sit(), ckpt)
    spec = {"in_channels": 1, "input_size": 32, "num_classes": 3}
    with pytest.raises(ImportError, match="no_such_pkg.load_model.*PYTHONPATH"):
        load_flow_model(ckpt, "no_such_pkg.load_model", **spec)
    with pytest.raises(ValueError, match="dotted path"):
        load_flow_model(ckpt, "load_model", **spec)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_flow_model(tmp_path / "missing.pt", "own_flow.load_reversed_sit", **spec)
    with pytest.raises(ValueError, match="either a SiT name"):
        load_frozen_base(str(ckpt), "SiT-XL/2", factory="own_flow.load_reversed_sit")
    base = load_frozen_base(str(ckpt), factory="own_flow.load_reversed_sit", **spec, **REVERSED)
    assert isinstance(base, FlowModel) and not base.training
    assert not any(p.requires_grad for p in base.parameters())
