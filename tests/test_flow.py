import pytest
import torch

from flowturbo.flow import (
    flow_matching_loss,
    interpolant_refiner_batch,
    interpolate,
    refiner_loss,
    sample_step_sizes,
    target_velocity,
    trajectory_refiner_batch,
)
from flowturbo.flow.analytic import ExactRefiner, GaussianMixtureFlow


def test_interpolant_convention():
    """t = 0 is noise, t = 1 is data, and d x_t / dt = x1 - x0."""
    x0, x1 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(4)), x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(4)), x1)
    t, eps = torch.rand(4) * 0.9, 1e-3
    fd = (interpolate(x0, x1, t + eps) - interpolate(x0, x1, t)) / eps
    torch.testing.assert_close(fd, target_velocity(x0, x1), rtol=1e-3, atol=1e-3)


def test_flow_matching_loss_is_pure_and_minimised_by_the_target():
    x0, x1, t = torch.randn(8, 2, 4, 4), torch.randn(8, 2, 4, 4), torch.rand(8)
    copies = [a.clone() for a in (x0, x1, t)]

    def oracle(x, tt):  # knows x0: returns the conditional target exactly
        return x1 - x0

    assert flow_matching_loss(oracle, x1, x0, t).item() == 0.0
    assert flow_matching_loss(lambda x, tt: torch.zeros_like(x), x1, x0, t).item() > 0.5
    for a, b in zip((x0, x1, t), copies, strict=True):
        assert torch.equal(a, b)


def test_step_sizes_stay_in_range():
    t = torch.tensor([0.0, 0.5, 0.95, 0.999])
    u = torch.tensor([0.0, 0.3, 0.99, 0.5])
    dt = sample_step_sizes(t, 0.12, u)
    assert bool((dt > 0).all()) and bool((dt <= 0.12).all()) and bool((t + dt <= 1).all())
    assert dt[0].item() == pytest.approx(0.12)
    with pytest.raises(ValueError, match="dt_max"):
        sample_step_sizes(t, 0.0, u)


@pytest.fixture
def flow():
    return GaussianMixtureFlow(
        torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.tensor([0.5, 1])
    )


def test_interpolant_targets(flow):
    """x' is one Euler step along V(x_t, t); the exact refiner has zero loss on the batch."""
    x0 = torch.randn(16, 2, 2, 2, dtype=torch.float64)
    x1 = flow.sample_data(16)
    t = torch.rand(16, dtype=torch.float64) * 0.9
    dt = sample_step_sizes(t, 0.1, torch.rand(16, dtype=torch.float64))
    batch = interpolant_refiner_batch(flow, x1, x0, t, dt)
    x_t = interpolate(x0, x1, t)
    torch.testing.assert_close(batch.v, flow(x_t, t))
    torch.testing.assert_close(batch.x, x_t + dt.reshape(-1, 1, 1, 1) * batch.v)
    torch.testing.assert_close(batch.t, t + dt)
    torch.testing.assert_close(batch.target, flow(batch.x, t + dt) - batch.v)
    assert refiner_loss(ExactRefiner(flow), batch).item() < 1e-20
    assert refiner_loss(lambda x, t, v: torch.zeros_like(x), batch).item() > 0


def test_trajectory_targets(flow):
    x_b, v_a, v_b = (torch.randn(3, 2, 2, 2) for _ in range(3))
    t_b = torch.rand(3)
    batch = trajectory_refiner_batch(x_b, t_b, v_a, v_b)
    assert batch.x is x_b and batch.v is v_a
    torch.testing.assert_close(batch.target, v_b - v_a)
