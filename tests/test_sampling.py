import math
import warnings

import pytest
import torch

from flowturbo.flow.analytic import ExactRefiner, GaussianMixtureFlow
from flowturbo.sampling import (
    BASELINES,
    ClassifierFreeGuidance,
    baseline_nfe,
    dopri5,
    euler,
    integrate,
    parse_schedule,
    sample,
    uniform_grid,
)


class Counter:
    """Counts evaluations (calls) and evaluated examples of a velocity function."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64) * 1.5
    return GaussianMixtureFlow(means, torch.tensor([0.4, 0.6, 0.5]))


@pytest.fixture(scope="module")
def noise():
    return torch.randn(
        64, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


@pytest.fixture(scope="module")
def reference(mixture, noise):
    return dopri5(mixture, noise, rtol=1e-11, atol=1e-11)


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("text", "plan", "base", "refiner", "normalised"),
    [
        ("E16", "E" * 16, 16, 0, "E16"),
        ("H8", "H" * 8, 16, 0, "H8"),
        ("H1P7", "H" + "P" * 7, 9, 0, "H1P7"),
        ("H2P4R3", "HHPPPPRRR", 8, 6, "H2P4R3"),
        ("P3", "PPP", 4, 0, "P3"),  # the first P has no cache: one more NFE
        ("h1p5r3", "HPPPPPRRR", 7, 6, "H1P5R3"),
        ("H08", "H" * 8, 16, 0, "H8"),  # one spelling: one row and one folder per schedule
        ("h02 P004r3", "HHPPPPRRR", 8, 6, "H2P4R3"),
        ("H4H4", "H" * 8, 16, 0, "H4H4"),  # blocks are kept as written
    ],
)
def test_parse_schedule(text, plan, base, refiner, normalised):
    s = parse_schedule(text)
    assert (s.plan, s.base_nfe, s.refiner_nfe, s.num_steps) == (plan, base, refiner, len(plan))
    assert s.text == normalised


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        ("H2X3", "'X'"),
        ("H2P", "'P'"),
        ("H0P3", "'H0'"),
        ("R2H3", "starts with R"),
        ("H2-P3", "'-'"),
        ("H\uff18", r"block 'H' has no step count \('\uff18' is not one of the digits 0-9\)"),
        ("H8P\u0664", "'P'"),  # an Arabic-Indic 4
        ("euler:16", "names a baseline solver, not a schedule"),
    ],
)
def test_bad_schedules_name_the_part(text, names):
    with pytest.raises(ValueError, match=names):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("plan", "names"), [("HX", r"unknown steps \['X'\]"), ("", "no step"), ("RH", "starts with R")]
)
def test_bad_plans_given_to_integrate_name_the_part(mixture, noise, plan, names):
    """integrate takes a plan (or a schedule string): it is checked the same way."""
    with pytest.raises(ValueError, match=names):
        integrate(plan, mixture, noise, refiner=ExactRefiner(mixture))


def test_integrate_takes_a_schedule_string_as_its_plan(mixture, noise):
    refiner = ExactRefiner(mixture)
    by_plan = integrate("HPPRR", mixture, noise, refiner=refiner)
    torch.testing.assert_close(integrate("H1P2R2", mixture, noise, refiner=refiner), by_plan)
    with pytest.raises(ValueError, match="'X'"):
        integrate("H1X2", mixture, noise)


def test_a_base_model_given_as_the_refiner_is_named():
    from flowturbo.models import SiT

    base = SiT.from_name("SiT-Tiny/4", input_size=8, in_channels=1, num_classes=3).eval()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    for refiner in (base, ClassifierFreeGuidance(base, 1.5, 3)):
        with pytest.raises(TypeError, match="is it the base model"):
            sample(base, x, "H1R1", refiner=refiner, y=y)


def test_the_vae_gets_its_own_dtype_and_returns_the_callers():
    """A bf16 (or fp16) VAE fed float32 latents or images failed inside diffusers."""
    from diffusers import AutoencoderKL

    from flowturbo.sampling import decode_latents, encode_images

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    ).to(torch.bfloat16)
    with torch.no_grad():
        images = decode_latents(torch.randn(2, 4, 8, 8), vae)
        latents = encode_images(images.clamp(-1, 1), vae)
    assert images.dtype == latents.dtype == torch.float32
    assert images.shape == (2, 3, 16, 16) and latents.shape == (2, 4, 8, 8)


def test_refiner_required_for_R_steps(mixture, noise):
    with pytest.raises(ValueError, match="no refiner"):
        sample(mixture, noise, "H2R2")


@pytest.mark.parametrize("schedule", ["E5", "H4", "H1P5", "H2P4R3", "P2R1E2H1"])
def test_nfe_counts_match_the_schedule(mixture, noise, schedule):
    base, ref = Counter(mixture), Counter(ExactRefiner(mixture))
    seen = []
    sample(base, noise, schedule, refiner=ref, callback=seen.append)
    s = parse_schedule(schedule)
    assert (base.calls, ref.calls) == (s.base_nfe, s.refiner_nfe)
    assert (seen[-1]["base_nfe"], seen[-1]["refiner_nfe"]) == (s.base_nfe, s.refiner_nfe)
    assert [e["step"] for e in seen] == list(range(s.num_steps))
    assert seen[-1]["t"] == 1.0


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_nfe_counts(mixture, noise, name):
    base = Counter(mixture)
    BASELINES[name](base, noise, 6)
    assert base.calls == baseline_nfe(name, 6)


# ---------------------------------------------------------------- accuracy


def test_dopri5_matches_closed_form():
    flow = GaussianMixtureFlow(torch.ones(1, 1, 2, 2) * 2.0, torch.tensor([0.3]))
    x0 = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = dopri5(flow, x0, rtol=1e-10, atol=1e-10)
    assert rms(out, flow.exact_solution(x0)) < 1e-8
    mid = dopri5(flow, x0, t_end=0.5, rtol=1e-10, atol=1e-10)
    assert rms(mid, flow.exact_solution(x0, 0.5)) < 1e-8


def test_dopri5_accuracy_of_a_sample_does_not_depend_on_its_batch():
    """A stiff sample (dx/dt = -30 x) among many easy ones (-0.1 x) is solved as well as alone."""
    rate = torch.full((1000, 1, 1, 1), 0.1, dtype=torch.float64)
    rate[0] = 30.0

    def decay(x, t):
        return -rate[: x.shape[0]] * x

    x0 = torch.ones(1000, 1, 2, 2, dtype=torch.float64)
    exact = math.exp(-30.0)
    alone = (dopri5(decay, x0[:1], rtol=1e-5, atol=1e-5)[0] - exact).abs().max()
    batched = (dopri5(decay, x0, rtol=1e-5, atol=1e-5)[0] - exact).abs().max()
    assert batched <= 2 * alone  # a batch-wide RMS let it be 17x worse


def _order(errors):
    """Observed convergence orders from errors at step counts N, 2N, 4N."""
    return [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]


def test_euler_is_first_order(mixture, noise, reference):
    errs = [rms(sample(mixture, noise, f"E{n}"), reference) for n in (32, 64, 128)]
    assert all(0.85 < p < 1.2 for p in _order(errs)), errs


@pytest.mark.parametrize("solver", ["heun", "midpoint", "multistep"])
def test_second_order_baselines(mixture, noise, reference, solver):
    errs = [rms(BASELINES[solver](mixture, noise, n), reference) for n in (32, 64, 128)]
    assert all(1.75 < p < 2.3 for p in _order(errs)), errs


def test_pseudo_corrector_is_close_to_second_order(mixture, noise, reference):
    errs = [rms(sample(mixture, noise, f"H1P{n - 1}"), reference) for n in (32, 64, 128)]
    orders = _order(errs)
    assert all(p > 1.75 for p in orders), (errs, orders)
    # cheaper than Heun with the same steps, and far better than Euler with the same NFE
    euler = rms(sample(mixture, noise, "E129"), reference)
    assert errs[-1] < euler / 10


def test_custom_grid(mixture, noise, reference):
    grid = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.8, 0.9, 1.0]) ** 1.5
    with_grid = sample(mixture, noise, "H6", timesteps=grid)
    manual = noise.clone()
    for t0, t1 in zip(grid[:-1].double(), grid[1:].double(), strict=True):
        h = t1 - t0
        d0 = mixture(manual, t0.expand(64))
        d1 = mixture(manual + h * d0, t1.expand(64))
        manual = manual + h / 2 * (d0 + d1)
    torch.testing.assert_close(with_grid, manual, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="7 times"):
        sample(mixture, noise, "H6", timesteps=uniform_grid(5))
    with pytest.raises(ValueError, match="increasing"):
        sample(mixture, noise, "H2", timesteps=[0.0, 0.7, 0.5])
    # a repeated time (a step of length 0) and a time past the data are refused, not run
    for bad, why in (
        ([0.0, 0.5, 0.5, 1.0], "be strictly increasing"),
        ([0.0, 0.5, 1.2], r"lie within \[0, 1\]"),
    ):
        n = len(bad) - 1
        with pytest.raises(ValueError, match=f"timesteps must {why}"):
            sample(mixture, noise, f"H{n}", timesteps=bad)
        with pytest.raises(ValueError, match=f"timesteps must {why}"):
            integrate("H" * n, mixture, noise, timesteps=bad)
    # sample and the baselines go from noise to data; part of the path is integrate's
    for partial in ([0.2, 0.6, 1.0], [0.0, 0.4, 0.8]):
        with pytest.raises(ValueError, match="must start at 0 and end at 1.*integrate"):
            sample(mixture, noise, "H2", timesteps=partial)
        with pytest.raises(ValueError, match="euler integrates from noise"):
            euler(mixture, noise, 2, timesteps=partial)
        assert integrate("HH", mixture, noise, timesteps=partial).shape == noise.shape


# ---------------------------------------------------------------- refiner steps


def test_exact_refiner_turns_R_into_heun(mixture, noise):
    """With R = V - v, an R step is a Heun step: d0 = V(x, t0), d1 = V(x~, t1)."""
    refined = sample(mixture, noise, "H2R3", refiner=ExactRefiner(mixture))
    heun = sample(mixture, noise, "H5")
    torch.testing.assert_close(refined, heun, rtol=0, atol=1e-12)


def test_refiner_input_modes(mixture, noise):
    """The second refiner call sees d0 by default, the incoming cache with 'cache'."""
    seen = []

    def refiner(x, t, v):
        seen.append(v)
        return mixture(x, t) - v

    x_half = integrate("H", mixture, noise, timesteps=[0.0, 0.5])  # the state before R
    half = torch.full((64,), 0.5)
    cache = mixture(noise + 0.5 * mixture(noise, torch.zeros(64)), half)
    sample(mixture, noise, "H1R1", refiner=refiner, refiner_input="cache")
    torch.testing.assert_close(seen[0], cache)
    assert torch.equal(seen[1], seen[0])
    seen.clear()
    sample(mixture, noise, "H1R1", refiner=refiner)
    torch.testing.assert_close(seen[0], cache)
    torch.testing.assert_close(seen[1], mixture(x_half, half))  # d0 = c + (V - c) = V(x, t0)
    with pytest.raises(ValueError, match="refiner_input"):
        sample(mixture, noise, "H1R1", refiner=refiner, refiner_input="d1")


@pytest.mark.parametrize("refiner_steps", [1, 2])
@pytest.mark.parametrize("refiner_input", ["d0", "cache"])
def test_refiner_step_by_hand(refiner_input, refiner_steps):
    """One H then R steps on v = a x, refiner R(x, t, v) = b v, checked by hand: the second
    call's input (d0, or the incoming cache c), d1 = d0 + R (not c + R), and the cache an R step
    leaves for the next one (d0, not d1)."""
    a, b = 0.7, 0.1
    model = lambda x, t: a * x  # noqa: E731
    refiner = lambda x, t, v: b * v  # noqa: E731
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = sample(model, x, f"H1R{refiner_steps}", refiner=refiner, refiner_input=refiner_input)
    h = 1 / (1 + refiner_steps)
    x1 = 1 + h / 2 * (a + a * (1 + h * a))
    c = a * (1 + h * a)
    for _ in range(refiner_steps):
        d0 = c + b * c
        d1 = d0 + b * (d0 if refiner_input == "d0" else c)
        x1, c = x1 + h / 2 * (d0 + d1), d0
    assert out.item() == pytest.approx(x1, rel=0, abs=1e-14)


# ---------------------------------------------------------------- guidance


def test_cfg_math():
    null = 10

    def fn(x, t, *extra, y):
        cond = (y != null).to(x.dtype).reshape(-1, 1, 1, 1)
        out = x + cond * 2.0 + t.reshape(-1, 1, 1, 1)
        return out + sum(extra) if extra else out

    x, t, y = torch.randn(3, 4, 2, 2), torch.rand(3), torch.tensor([1, 2, 3])
    s = 1.5
    guided = ClassifierFreeGuidance(fn, s, null)(x, t, y=y)
    uncond, cond = x + t.reshape(-1, 1, 1, 1), x + 2 + t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(guided, uncond + s * (cond - uncond))
    three = ClassifierFreeGuidance(fn, s, null, channels=3)(x, t, y=y)
    torch.testing.assert_close(three[:, :3], guided[:, :3])
    torch.testing.assert_close(three[:, 3:], cond[:, 3:])
    v = torch.randn_like(x)
    refined = ClassifierFreeGuidance(fn, s, null)(x, t, v, y=y)
    torch.testing.assert_close(refined, guided + v)


def test_cfg_one_batch_of_2B_and_scale_one_skips_it():
    sizes = []

    def fn(x, t, y):
        sizes.append(x.shape[0])
        return x

    x, t, y = torch.randn(4, 1, 2, 2), torch.rand(4), torch.zeros(4, dtype=torch.long)
    ClassifierFreeGuidance(fn, 4.0, 5)(x, t, y=y)
    ClassifierFreeGuidance(fn, 1.0, 5)(x, t, y=y)
    assert sizes == [8, 4]


def test_cfg_refuses_a_sit_without_a_null_class():
    from flowturbo.models import SiT

    spec = {"input_size": 8, "in_channels": 1, "num_classes": 3}
    no_null = SiT.from_name("SiT-Tiny/4", class_dropout_prob=0.0, **spec)
    with pytest.raises(ValueError, match="3 label embeddings .* class_dropout_prob=0"):
        ClassifierFreeGuidance(no_null, 1.5, 3)
    ClassifierFreeGuidance(no_null, 1.0, 3)  # no guidance: no null class needed
    ClassifierFreeGuidance(SiT.from_name("SiT-Tiny/4", **spec), 1.5, 3)


# ---------------------------------------------------------------- compilation


class TinyVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.emb = torch.nn.Embedding(4, 2)

    def forward(self, x, t, y):
        return torch.tanh(self.conv(x)) * t.reshape(-1, 1, 1, 1) + self.emb(y)[..., None, None]


class TinyRefiner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x, t, v, y):
        return 0.1 * torch.tanh(self.conv(torch.cat([x, v], 1))) * (1 - t.reshape(-1, 1, 1, 1))


def _counting_backend():
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    return backend, compiled


@torch.no_grad()
def test_compile_reuses_programs_and_recompiles_on_new_shape():
    torch.manual_seed(0)
    model, refiner = TinyVelocity().eval(), TinyRefiner().eval()
    backend, compiled = _counting_backend()
    opts = {"backend": backend}
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 3])
    eager = sample(model, x, "H2P2R2", refiner=refiner, y=y)
    out = sample(model, x, "H2P2R2", refiner=refiner, compile=opts, y=y)
    torch.testing.assert_close(out, eager)
    n = len(compiled)
    assert n >= 3  # one program per step kind at least
    again = sample(model, x + 1, "H2P2R2", refiner=refiner, compile=opts, y=y)
    assert len(compiled) == n  # same settings: nothing recompiled
    assert not torch.equal(again, out)  # fresh inputs, fresh outputs
    sample(
        model, torch.randn(3, 2, 4, 4), "H2P2R2", refiner=refiner, compile=opts, y=y.repeat(2)[:3]
    )
    assert len(compiled) > n  # a new batch shape compiles anew


@torch.no_grad()
def test_compile_recompile_limit_is_a_recorded_fallback(monkeypatch):
    """Past torch.compile's recompile limit, torch itself would run new shapes eagerly without
    a word; the sampler must then warn and record the fallback, or eager latency is reported
    as compiled."""
    from flowturbo.sampling import compile as compile_mod

    monkeypatch.setattr(compile_mod, "_CACHE", {})
    monkeypatch.setattr(compile_mod, "_WARNED", set())
    torch._dynamo.reset()
    model = TinyVelocity().eval()
    backend, compiled = _counting_backend()
    options = {**compile_mod.default_compile_options(torch.device("cpu")), "backend": backend}
    with (
        torch._dynamo.config.patch(recompile_limit=2),
        pytest.warns(RuntimeWarning, match="recompile_limit"),
    ):
        for b in (1, 2, 3):
            x, y = torch.randn(b, 2, 4, 4), torch.arange(b)
            out = sample(model, x, "H2", compile={"backend": backend}, y=y)
            torch.testing.assert_close(out, sample(model, x, "H2", y=y))
    assert len(compiled) == 2  # two shapes compiled, the third refused
    assert compile_mod.compiled_steps(options)["H"].failed
    assert not torch._dynamo.config.fail_on_recompile_limit_hit  # the user's setting is back


@pytest.mark.slow
@torch.no_grad()
def test_inductor_compiled_equals_eager():
    torch.manual_seed(0)
    model, refiner = TinyVelocity().eval(), TinyRefiner().eval()
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([1, 2])
    eager = sample(model, x, "H1P2R2", refiner=refiner, y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compilation must not silently fall back
        compiled = sample(model, x, "H1P2R2", refiner=refiner, compile=True, y=y)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    from flowturbo.sampling import compile as compile_mod

    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(compile_mod.torch, "compile", broken_compile)
    monkeypatch.setattr(compile_mod, "_CACHE", {})
    monkeypatch.setattr(compile_mod, "_WARNED", set())
    model = TinyVelocity().eval()
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as record:
        out = sample(model, x, "H2P2", compile=True, y=y)
        sample(model, x, "E3", compile=True, y=y)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, sample(model, x, "H2P2", y=y))


def test_errors_in_the_model_are_not_hidden_by_the_fallback(monkeypatch):
    from flowturbo.sampling import compile as compile_mod

    monkeypatch.setattr(compile_mod, "_CACHE", {})

    def bad(x, t, y):
        raise KeyError("model bug")

    with pytest.raises(KeyError, match="model bug"):
        sample(bad, torch.randn(1, 2, 4, 4), "E1", compile={"backend": "eager"}, y=None)


# ------------------------------------------------------- whole-sampler compilation


@pytest.fixture
def fresh_compile_caches(monkeypatch):
    from flowturbo.sampling import compile as compile_mod

    monkeypatch.setattr(compile_mod, "_CACHE", {})
    compile_mod.SAMPLERS.clear()
    yield compile_mod.SAMPLERS
    compile_mod.SAMPLERS.clear()


def test_compiled_sampler_equals_eager_and_is_reused_per_setting(fresh_compile_caches):
    from flowturbo.sampling import compiled_sampler

    torch.manual_seed(0)
    model, refiner = TinyVelocity().eval(), TinyRefiner().eval()
    backend, compiled = _counting_backend()
    opts = {"backend": backend}
    guided = ClassifierFreeGuidance(model, 2.0, 3)
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    with torch.no_grad():
        eager = sample(guided, x, "H1P2R2", refiner=refiner, y=y)
    run = compiled_sampler("HPPRR", guided, x, refiner=refiner, compile_options=opts, y=y)
    torch.testing.assert_close(run(x, y=y), eager)
    assert run.fully_compiled and run.graph is None  # no CUDA graph on the CPU
    assert len(compiled) == 2  # the guided base and the refiner, each compiled once
    assert not torch.is_grad_enabled() or not run(x, y=y).requires_grad

    # the same settings give the same sampler, and nothing is compiled again
    assert compiled_sampler("HPPRR", guided, x, refiner=refiner, compile_options=opts, y=y) is run
    assert compiled_sampler("H1P2R2", guided, x, refiner=refiner, compile_options=opts, y=y) is run
    out_a = run(x, y=y)
    out_b = run(x * 0.5, y=torch.tensor([1, 1]))  # fresh inputs after a replay ...
    assert not torch.allclose(out_b, out_a)  # ... give fresh outputs
    torch.testing.assert_close(out_a, eager)  # and the earlier output is untouched
    with torch.no_grad():
        expected_b = sample(guided, x * 0.5, "H1P2R2", refiner=refiner, y=torch.tensor([1, 1]))
    torch.testing.assert_close(out_b, expected_b)
    assert len(compiled) == 2

    # any setting that changes the program builds another sampler
    others = [
        compiled_sampler("HPPPRR", guided, x, refiner=refiner, compile_options=opts, y=y),
        compiled_sampler("HPPRR", guided, x[:1], refiner=refiner, compile_options=opts, y=y[:1]),
        compiled_sampler("HPPRR", guided, x, refiner=refiner, refiner_input="cache", y=y),
        compiled_sampler("HPPRR", guided, x.double(), refiner=refiner, y=y),
    ]
    assert len({id(s) for s in [run, *others]}) == 5 and len(fresh_compile_caches) == 5
    # another grid is another program: its samples are those of that grid
    grid = [0.0, 0.1, 0.3, 0.6, 0.8, 1.0]
    on_grid = compiled_sampler(
        "HPPRR", guided, x, refiner=refiner, compile_options=opts, timesteps=grid, y=y
    )
    assert on_grid is not run and len(fresh_compile_caches) == 6
    with torch.no_grad():
        expected = sample(guided, x, "H1P2R2", refiner=refiner, timesteps=grid, y=y)
    torch.testing.assert_close(on_grid(x, y=y), expected)


def test_evicted_compiled_samplers_free_their_models(fresh_compile_caches):
    """Each sampler's compiled networks stayed in the process-wide cache after the sampler
    left it: every model ever sampled with compile="sampler" stayed in memory (on the GPU)."""
    import gc
    import weakref

    from flowturbo.sampling import compiled_sampler
    from flowturbo.sampling.graph import MAX_CACHED_SAMPLERS

    x, y = torch.randn(1, 2, 4, 4), torch.tensor([1])
    alive = []
    for _ in range(MAX_CACHED_SAMPLERS + 4):
        model = TinyVelocity().eval()
        alive.append(weakref.ref(model))
        compiled_sampler("HH", model, x, compile_options={"backend": "eager"}, y=y)
        del model
    gc.collect()
    assert len(fresh_compile_caches) == MAX_CACHED_SAMPLERS
    assert sum(r() is not None for r in alive) == MAX_CACHED_SAMPLERS
    assert [r() is None for r in alive[:4]] == [True] * 4  # the oldest were freed


def test_compile_options_may_nest_and_grids_may_be_columns(fresh_compile_caches):
    """torch.compile's own options={...} made the cache key unhashable, as did a (N + 1, 1)
    grid for compiled_sampler, which eager sampling takes."""
    from flowturbo.sampling import compiled_sampler
    from flowturbo.sampling.compile import compiled_function

    model = TinyVelocity().eval()
    nested = {"options": {"max_autotune": False}}
    assert compiled_function(model, nested) is compiled_function(model, dict(nested))
    x, y = torch.randn(1, 2, 4, 4), torch.tensor([1])
    run = compiled_sampler("HH", model, x, compile_options={"backend": "eager", **nested}, y=y)
    column = torch.tensor([[0.0], [0.3], [1.0]])
    on_grid = compiled_sampler("HH", model, x, timesteps=column, y=y)
    assert on_grid is not run
    with torch.no_grad():
        torch.testing.assert_close(on_grid(x, y=y), sample(model, x, "H2", timesteps=column, y=y))


def test_an_adams_bashforth_step_only_follows_steps_that_cache_its_velocity():
    """A after H, P, M or R extrapolated from a velocity of another point: wrong, silently."""
    from flowturbo.sampling.steps import step_kinds

    assert step_kinds("AAA") == ["A"] * 3 and step_kinds("EA") == ["E", "A"]
    for plan in ("HA", "PA", "MA", "HRA"):
        with pytest.raises(ValueError, match="A \\(Adams-Bashforth\\) step .* follows"):
            step_kinds(plan)


def test_sampling_a_sit_in_training_mode_is_warned_about(monkeypatch):
    """A SiT left in training mode drops labels to the null class at random on every
    evaluation: a third of the samples changed, without a word."""
    from flowturbo.models import SiT
    from flowturbo.sampling import compile as compile_mod

    monkeypatch.setattr(compile_mod, "_WARNED", set())
    spec = {"input_size": 8, "in_channels": 1, "num_classes": 3}
    net = SiT.from_name("SiT-Tiny/4", **spec)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.warns(RuntimeWarning, match="SiT in training mode"), torch.no_grad():
        sample(net, x, "E1", y=y)
    quiet = SiT.from_name("SiT-Tiny/4", class_dropout_prob=0.0, **spec)  # nothing random
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(quiet, x, "E1", y=y)
        sample(net.eval(), x, "E1", y=y)


def test_compiled_sampler_is_rebuilt_when_a_network_changes_in_place(fresh_compile_caches):
    """A recorded CUDA graph replays the guidance scale and the weights' memory it was recorded
    with: a changed scale, mode or dtype of the same objects must not reuse it."""
    from flowturbo.sampling import compiled_sampler

    model, refiner = TinyVelocity().eval(), TinyRefiner().eval()
    guided = ClassifierFreeGuidance(model, 2.0, 3)
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    opts = {"backend": "eager"}

    def build():
        return compiled_sampler("HPR", guided, x, refiner=refiner, compile_options=opts, y=y)

    first = build()
    assert build() is first
    guided.scale = 3.0
    second = build()
    guided.channels = 1  # guidance on the first channel only
    one_channel = build()
    with torch.no_grad():
        expected = sample(guided, x, "H1P1R1", refiner=refiner, y=y)
    torch.testing.assert_close(one_channel(x, y=y), expected)
    guided.channels = None
    assert build() is second
    refiner.train()
    third = build()
    refiner.eval()
    assert build() is second  # back to the state it was built in
    model.double()
    fourth = build()
    assert len({id(s) for s in (first, second, one_channel, third, fourth)}) == 5
    refiner.double()
    with torch.no_grad():
        expected = sample(guided, x.double(), "H1P1R1", refiner=refiner, y=y)
    run = compiled_sampler("HPR", guided, x.double(), refiner=refiner, compile_options=opts, y=y)
    torch.testing.assert_close(run(x.double(), y=y), expected)


def test_compiled_sampler_refuses_inputs_it_was_not_built_for(fresh_compile_caches):
    from flowturbo.sampling import CompiledSampler

    model = TinyVelocity().eval()
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    run = CompiledSampler("HH", model, x, compile=False, y=y)
    assert not run.fully_compiled
    with pytest.raises(ValueError, match=r"noise: \(3, 2, 4, 4\) float32 on cpu instead of \(2"):
        run(torch.randn(3, 2, 4, 4), y=y)
    with pytest.raises(ValueError, match=r"y: \(2,\) int32 .* instead of \(2,\) int64"):
        run(x, y=y.int())
    with pytest.raises(ValueError, match="keyword arguments"):
        run(x)

    # a value that is not a tensor is fixed for the sampler's lifetime: another one is refused
    def scaled(x, t, y, k):
        return k * model(x, t, y)

    run = CompiledSampler("HH", scaled, x, compile=False, y=y, k=2)
    with torch.no_grad():
        torch.testing.assert_close(run(x, y=y, k=2), sample(scaled, x, "H2", y=y, k=2))
    with pytest.raises(ValueError, match="k=3 instead of 2"):
        run(x, y=y, k=3)
    with pytest.raises(ValueError, match="no refiner"):
        CompiledSampler("HR", model, x, y=y)


def test_sample_compile_sampler_mode(fresh_compile_caches):
    torch.manual_seed(0)
    model, refiner = TinyVelocity().eval(), TinyRefiner().eval()
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([3, 1])
    with torch.no_grad():
        eager = sample(model, x, "H1P2R2", refiner=refiner, refiner_input="cache", y=y)
        whole = sample(
            model, x, "H1P2R2", refiner=refiner, refiner_input="cache", compile="sampler", y=y
        )
        torch.testing.assert_close(whole, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            BASELINES["midpoint"](model, x, 3, compile="sampler", y=y),
            BASELINES["midpoint"](model, x, 3, y=y),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="per-step callback"):
        sample(model, x, "H2", compile="sampler", progress=True, y=y)
    with pytest.raises(ValueError, match="'steps', 'sampler'"):
        sample(model, x, "H2", compile="graph", y=y)


def test_integrate_takes_a_parsed_schedule() -> None:
    model = lambda x, t: -x  # noqa: E731
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    sched = parse_schedule("H2P2")
    assert torch.equal(integrate(sched, model, x), integrate(sched.plan, model, x))
    with pytest.raises(TypeError, match="step plan is a string"):
        integrate(8, model, x)


@pytest.mark.parametrize("steps", [2.5, "H8", 3.0])
def test_fixed_step_solvers_refuse_non_integer_steps(steps) -> None:
    with pytest.raises(TypeError, match="steps must be an integer"):  # 2.5 ran 2 steps
        BASELINES["heun"](lambda x, t: -x, torch.randn(2, 1, 2, 2), steps)


def test_guidance_names_misshaped_labels() -> None:
    cfg = ClassifierFreeGuidance(lambda x, t, y: x, scale=2.0, null_class=3)
    x, t = torch.randn(2, 1, 2, 2), torch.rand(2)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\), got \(2, 1\)"):
        cfg(x, t, y=torch.tensor([[0], [1]]))


@pytest.mark.parametrize("shape", [(4, 1, 1, 1), (1, 3, 8, 8), (3, 8, 8), (4, 1, 8, 8)])
def test_a_velocity_that_would_broadcast_into_x_is_refused(shape) -> None:
    def v(x, t):
        return torch.ones(shape)

    for schedule in ("E2", "H2", "H1P1"):
        with pytest.raises(ValueError, match=r"velocity of shape .* x of shape \(4, 3, 8, 8\)"):
            sample(v, torch.randn(4, 3, 8, 8), schedule)


def test_to_uint8_refuses_images_that_are_not_finite() -> None:
    """NaN clamps to 0: a NaN checkpoint would give black images and report success."""
    from flowturbo.sampling import to_uint8

    images = torch.zeros(4, 3, 2, 2)
    images[1, 0, 0, 0], images[3, 2, 1, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 of 4 images hold NaN or infinite values"):
        to_uint8(images)
    assert to_uint8(torch.tensor([-2.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_from_uint8_refuses_float_images() -> None:
    from flowturbo.sampling import from_uint8

    with pytest.raises(TypeError, match="uint8"):  # [0, 1] floats became -1 silently
        from_uint8(torch.rand(1, 3, 4, 4))
    assert from_uint8(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("guided", [False, True])
def test_labels_a_sit_has_no_embedding_for_are_refused_in_words(guided):
    """An out-of-range label was PyTorch's 'index out of range in self' on the CPU (a
    device-side assert on a GPU); the null class itself is a valid label."""
    from flowturbo.models import SiT

    torch.manual_seed(0)
    net = SiT.from_name("SiT-Tiny/4", input_size=8, in_channels=1, num_classes=10).eval()
    model = ClassifierFreeGuidance(net, 1.5, 10) if guided else net
    noise = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        sample(model, noise, "E1", y=torch.tensor([0, 9, 10]))  # 10: the null class
        for bad in ([0, 11, 3], [-1, 2, 3]):
            with pytest.raises(ValueError, match=r"must lie in 0\.\.10 \(10 is the null class\)"):
                sample(model, noise, "H1P1", y=torch.tensor(bad))
        with pytest.raises(TypeError, match="integer tensor"):
            sample(model, noise, "E1", y=torch.tensor([0.0, 1.0, 2.0]))


def test_a_bfloat16_state_gets_its_times_in_float32():
    """Times rounded to the state's bfloat16 gave heun_trajectory's 300-step grid steps of
    length 0 (22 of them) and times 2e-3 off k / N, where the refiner's trajectory targets
    take them as exact; the sampler already kept its times in float32."""
    from flowturbo.sampling import CompiledSampler, heun_trajectory

    seen = []

    def v(x, t):
        seen.append(t)
        return -x

    noise = torch.randn(2, 1, 4, 4).to(torch.bfloat16)
    states, velocities, times = heun_trajectory(v, noise, 300)
    assert times.dtype == torch.float32 and states.dtype == torch.bfloat16
    assert torch.equal(times, uniform_grid(300).float())
    assert all(t.dtype == torch.float32 for t in seen) and torch.diff(times).min() > 0
    seen.clear()
    dopri5(v, noise, rtol=1e-2, atol=1e-2)
    assert seen and all(t.dtype == torch.float32 for t in seen)
    seen.clear()
    sample(v, noise, "H2P2")
    assert all(t.dtype == torch.float32 for t in seen)
    seen.clear()
    CompiledSampler("HHP", v, noise, compile=False)(noise)  # compile="sampler"'s program
    assert all(t.dtype == torch.float32 for t in seen)
    grid = uniform_grid(3).float()  # H at t0 and t1, H at t1 and t2, P at t3
    assert torch.equal(torch.stack([t[0] for t in seen]), grid[[0, 1, 1, 2, 3]])


def test_heun_trajectory_stores_the_base_velocity_at_each_stored_point(mixture, noise):
    """velocities[:, k] is v(x_k, t_k), the velocity the refiner's trajectory targets take,
    not the corrector's velocity at the predicted point; the last state is sample's H steps."""
    from flowturbo.sampling import heun_trajectory

    states, velocities, times = heun_trajectory(mixture, noise, 4)
    assert states.shape == velocities.shape == (64, 5, 2, 2, 2)
    torch.testing.assert_close(times, uniform_grid(4))
    for k in range(5):
        expected = mixture(states[:, k], times[k].expand(64))
        torch.testing.assert_close(velocities[:, k], expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(states[:, -1], sample(mixture, noise, "H4"), rtol=0, atol=1e-13)
