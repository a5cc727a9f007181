"""Denoiser adapters against the exact Gaussian-mixture model: every prediction type gives the same
x0_hat, discrete time inputs, learned variance, classifier-free and classifier guidance, and
dynamic thresholding (also in half precision)."""
import math

import pytest
import torch

import fewstep
from fewstep.data.gmm import GaussianMixture
from fewstep.denoisers import ClassifierFreeGuidance, ClassifierGuidance, MemoDenoiser, ModelDenoiser, Thresholded, \
    dynamic_threshold
from fewstep.schedules import EDM, CosineVP, DiscreteVP, LinearVP, RectifiedFlow

F64 = torch.float64
D = 6


def mixture():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, D, generator=g, dtype=F64) * 1.5
    return GaussianMixture(means, torch.tensor([0.4, 0.7, 0.5]), weights=torch.tensor([0.5, 0.3, 0.2]),
                           labels=torch.tensor([0, 1, 1]))


def scalar_time(t) -> float:
    """The single time shared by the batch (the adapters call models with a (B,) tensor)."""
    t = torch.as_tensor(t, dtype=F64).flatten()
    assert torch.all(t == t[0]), "these test models expect one time for the whole batch"
    return float(t[0])


def exact_outputs(gm, schedule, prediction):
    """A model that predicts ``prediction`` exactly, built from the mixture's definitions only.

    eps, x0 and v come from the exact posterior mean; score is the autograd gradient of the
    noised marginal's log-density (independent of Tweedie's formula); flow is the rectified-flow
    probability-flow ODE velocity dx/dt = f x - g^2/2 score with f = -1/(1 - t), g^2 = 2t/(1 - t).
    """
    exact = gm.denoiser(schedule)

    def model(x, t):
        tt = scalar_time(t)
        tt64 = torch.tensor(tt, dtype=F64)
        a, s = float(schedule.alpha(tt64)), float(schedule.sigma(tt64))
        x0 = exact(x, tt)
        if prediction == "x0":
            return x0
        eps = (x - a * x0) / s
        if prediction == "eps":
            return eps
        if prediction == "v":
            return a * eps - s * x0
        xg = x.detach().requires_grad_(True)
        score, = torch.autograd.grad(gm.marginal(schedule, tt).log_prob(xg).sum(), xg)
        if prediction == "score":
            return score
        assert prediction == "flow" and isinstance(schedule, RectifiedFlow)
        return -x / (1 - tt) - tt / (1 - tt) * score

    return model


CASES = ([(LinearVP(), p, t) for p in ("eps", "x0", "v", "score") for t in (0.05, 0.5, 0.95)]
         + [(CosineVP(), p, t) for p in ("eps", "v", "score") for t in (0.1, 0.8)]
         + [(EDM(), p, t) for p in ("eps", "x0", "v", "score") for t in (0.05, 1.0, 20.0)]
         + [(RectifiedFlow(), p, t) for p in ("eps", "x0", "v", "score", "flow") for t in (0.1, 0.5, 0.9)])


@pytest.mark.parametrize("schedule,prediction,t", CASES, ids=lambda v: getattr(v, "kind", v))
def test_every_prediction_type_gives_the_exact_x0(schedule, prediction, t):
    gm = mixture()
    exact = gm.denoiser(schedule)
    x = gm.marginal(schedule, t).sample(16, generator=torch.Generator().manual_seed(0))[0].to(F64)
    den = ModelDenoiser(exact_outputs(gm, schedule, prediction), schedule, prediction)
    got = den(x, t)
    want = exact(x, t)
    # float64 throughout; the conversions divide by alpha (>= 0.05 here): 1e-9 is round-off with margin
    assert got.dtype == F64
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (got - want).abs().max()


def test_unknown_prediction_type_and_time_input_are_rejected():
    with pytest.raises(ValueError, match="unknown prediction type 'epsilon'.*eps, x0, v, score, flow"):
        ModelDenoiser(lambda x, t: x, LinearVP(), "epsilon")
    with pytest.raises(ValueError, match="time_input='discrete' needs a DiscreteVP"):
        ModelDenoiser(lambda x, t: x, LinearVP(), "eps", time_input="discrete")


# -- time inputs ----------------------------------------------------------------------

def test_discrete_time_input_maps_t_n_to_step_n():
    sch = DiscreteVP.from_name("linear")
    seen = []

    def model(x, n):
        seen.append(n.clone())
        return torch.zeros_like(x)

    den = ModelDenoiser(model, sch, "eps", time_input="discrete")
    steps = torch.tensor([0, 1, 250, 998, 999], dtype=F64)
    for n in steps:
        den(torch.zeros(3, 2, dtype=F64), float((n + 1) / sch.N))
    got = torch.stack([s[0] for s in seen])
    assert torch.all(torch.stack(seen).eq(got[:, None]))  # one input for the whole batch
    assert (got - steps).abs().max() < 1e-9  # float64 round-off of (t - 1/N) * N
    # half-way between two knots the input is fractional (the schedule interpolates in between)
    den(torch.zeros(1, 2, dtype=F64), (10 + 1.5) / sch.N)
    assert abs(float(seen[-1][0]) - 10.5) < 1e-9
    # a float32 model gets float32 timesteps, still the exact integers (they are representable)
    den(torch.zeros(1, 2), 1.0)
    assert seen[-1].dtype == torch.float32 and float(seen[-1][0]) == 999.0


def test_discrete_eps_model_gives_the_exact_x0_at_the_knots():
    sch = DiscreteVP.from_name("linear")
    gm = mixture()
    ac = sch.alphas_cumprod

    def eps_model(x, n):  # the model sees integer steps and uses alphas_cumprod[n] directly
        i = int(round(scalar_time(n)))
        a, s = math.sqrt(ac[i]), math.sqrt(1 - ac[i])
        x0 = gm.posterior_mean(x, torch.full((x.shape[0],), a, dtype=F64), torch.full((x.shape[0],), s, dtype=F64))
        return (x - a * x0) / s

    den = ModelDenoiser(eps_model, sch, "eps", time_input="discrete")
    x = torch.randn(8, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    for n in (0, 99, 500, 999):
        t = (n + 1) / sch.N
        # 1e-9: the knot value of the interpolated alpha equals sqrt(alphas_cumprod[n]) up to round-off
        assert torch.allclose(den(x, t), gm.denoiser(sch)(x, t), rtol=1e-9, atol=1e-9)


def test_edm_sigma_and_callable_time_inputs():
    sch = LinearVP()
    seen = []
    den = ModelDenoiser(lambda x, s: seen.append(s) or torch.zeros_like(x), sch, "x0", time_input="edm_sigma")
    den(torch.zeros(2, 3, dtype=F64), 0.3)
    t = torch.tensor(0.3, dtype=F64)
    assert abs(float(seen[-1][0]) - float(sch.sigma(t) / sch.alpha(t))) < 1e-12
    den = ModelDenoiser(lambda x, s: seen.append(s) or torch.zeros_like(x), sch, "x0", time_input=lambda t: 1000 * t)
    den(torch.zeros(2, 3, dtype=F64), 0.3)
    assert torch.allclose(seen[-1], torch.full((2,), 300.0, dtype=F64))


def test_learned_variance_keeps_the_first_half_of_the_channels():
    sch = LinearVP()
    gm = GaussianMixture(torch.zeros(1, 2 * 4 * 4), torch.ones(1))
    eps_model = exact_outputs(gm, sch, "eps")

    def flat_eps(x, t):
        return eps_model(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    def with_variance(x, t):  # (B, 2C, H, W): the prediction, then a "variance" that must be ignored
        return torch.cat([flat_eps(x, t), 1e3 * torch.ones_like(x)], dim=1)

    x = torch.randn(3, 2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    plain = ModelDenoiser(flat_eps, sch, "eps")(x, 0.4)
    learned = ModelDenoiser(with_variance, sch, "eps", learned_variance=True)(x, 0.4)
    assert torch.equal(plain, learned)
    with pytest.raises(ValueError, match=r"model output shape \(3, 4, 4, 4\) does not match the input "
                                         r"\(3, 2, 4, 4\).*learned_variance=True"):
        ModelDenoiser(with_variance, sch, "eps")(x, 0.4)


# -- classifier-free guidance -------------------------------------------------------------

def conditional_denoiser(gm, schedule, calls):
    """The exact class-conditional denoiser; label -1 means unconditional. Records each call's batch."""
    exact = gm.denoiser(schedule)

    def den(x, t, labels):
        calls.append(x.shape[0])
        t = torch.as_tensor(t, dtype=F64).flatten().expand(x.shape[0])
        out = torch.empty_like(x)
        u = labels < 0
        if u.any():
            out[u] = exact(x[u], t[u])
        if (~u).any():
            out[~u] = exact(x[~u], t[~u], labels=labels[~u])
        return out

    return den


@pytest.mark.parametrize("w", [0.5, 3.0, -0.5])
def test_classifier_free_guidance_matches_its_formula_in_one_batched_call(w):
    sch, gm, calls = LinearVP(), mixture(), []
    den = conditional_denoiser(gm, sch, calls)
    x = torch.randn(5, D, dtype=F64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 1, 0, 1])
    null = torch.full((5,), -1)
    cfg = ClassifierFreeGuidance(den, w, uncond={"labels": null})
    got = cfg(x, 0.6, labels=y)
    assert calls == [10]  # one call on the doubled batch
    x_c, x_u = den(x, 0.6, labels=y), den(x, 0.6, labels=null)
    # same float64 numbers combined in the same way: only round-off
    assert torch.allclose(got, (1 + w) * x_c - w * x_u, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(x_c, x_u, atol=1e-3)  # the test would be vacuous otherwise
    # the same guidance on eps at the same x is diffusers' eps_u + s (eps_c - eps_u), s = 1 + w
    t6 = torch.tensor(0.6, dtype=F64)
    a, s = float(sch.alpha(t6)), float(sch.sigma(t6))
    eps = lambda x0: (x - a * x0) / s  # noqa: E731
    # 1e-9: dividing by sigma = 0.9 and regrouping sums only moves round-off
    assert torch.allclose(eps(got), eps(x_u) + (1 + w) * (eps(x_c) - eps(x_u)), rtol=1e-9, atol=1e-9)
    # uncond as a callable cond -> uncond gives the same answer
    calls.clear()
    cfg2 = ClassifierFreeGuidance(den, w, uncond=lambda cond: {"labels": torch.full_like(cond["labels"], -1)})
    assert torch.equal(cfg2(x, 0.6, labels=y), got) and calls == [10]


def test_classifier_free_guidance_with_w0_is_the_conditional_model_in_one_call():
    sch, gm, calls = LinearVP(), mixture(), []
    den = conditional_denoiser(gm, sch, calls)
    x = torch.randn(4, D, dtype=F64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 0, 1])
    got = ClassifierFreeGuidance(den, 0.0, uncond={"labels": torch.full((4,), -1)})(x, 0.3, labels=y)
    assert calls == [4]
    assert torch.equal(got, den(x, 0.3, labels=y))


def test_classifier_free_guidance_inside_a_sampler_spends_one_call_per_step():
    sch, gm, calls = LinearVP(), mixture(), []
    den = conditional_denoiser(gm, sch, calls)
    y = torch.tensor([0, 1, 1])
    cfg = ClassifierFreeGuidance(den, 2.0, uncond={"labels": torch.full((3,), -1)})
    out = fewstep.sample(cfg, torch.randn(3, D, dtype=F64), sch, solver="dpmpp_2m", steps=7, cond={"labels": y})
    assert out.nfe == 7 and calls == [6] * 7


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf")])
def test_classifier_free_guidance_rejects_non_finite_w(w):
    with pytest.raises(ValueError, match="guidance weight w must be finite"):
        ClassifierFreeGuidance(lambda x, t, **c: x, w, uncond={})


def test_classifier_free_guidance_needs_every_conditioning_key_twice():
    cfg = ClassifierFreeGuidance(lambda x, t, **c: x, 1.0, uncond={"labels": torch.zeros(2)})
    with pytest.raises(ValueError, match="conditioning 'text' must be given for both"):
        cfg(torch.zeros(2, 3), 0.5, labels=torch.zeros(2), text=torch.zeros(2, 4))


# -- classifier guidance --------------------------------------------------------------------

def exact_classifier(gm, schedule):
    """logits_c(x_t) = log p(c) + log p(x_t | c) for the mixture noised to time t (written out here)."""
    classes = gm.labels.unique()

    def classifier(x, t, **_):
        a = schedule.alpha(t)[:, None, None]
        s = schedule.sigma(t)[:, None, None]
        var = a ** 2 * gm.stds[None] ** 2 + s ** 2                      # (B, K, D)
        resid = x[:, None, :] - a * gm.means[None]
        log_joint = torch.log(gm.weights) - 0.5 * (resid ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return torch.stack([torch.logsumexp(log_joint[:, gm.labels == c], 1) for c in classes], 1)

    return classifier


def test_classifier_guidance_with_the_exact_classifier_gives_the_conditional_denoiser():
    # Bayes: grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t); with Tweedie, scale 1 turns
    # the unconditional posterior mean into E[x0 | x_t, y] exactly.
    sch, gm = LinearVP(), mixture()
    exact = gm.denoiser(sch)
    base = lambda x, t, labels=None: exact(x, t)  # noqa: E731  (unconditional; ignores the label)
    x = torch.randn(6, D, dtype=F64, generator=torch.Generator().manual_seed(6)) * 1.5
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    for t in (0.3, 0.6):
        got = ClassifierGuidance(base, exact_classifier(gm, sch), sch, scale=1.0)(x, t, labels=y)
        want = exact(x, t, labels=y)
        # ClassifierGuidance takes log_softmax in float32: ~1e-7 relative on a gradient scaled by sigma^2/alpha
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        assert (exact(x, t) - want).abs().max() > 0.1  # guidance changed x0_hat substantially


def test_classifier_guidance_moves_x0_toward_the_class_mean():
    sch, gm = LinearVP(), mixture()
    exact = gm.denoiser(sch)
    base = lambda x, t, labels=None: exact(x, t)  # noqa: E731
    x = torch.randn(64, D, dtype=F64, generator=torch.Generator().manual_seed(7)) * 1.5
    for label in (0, 1):
        y = torch.full((64,), label)
        comp = gm.labels == label
        class_mean = (gm.weights[comp, None] * gm.means[comp]).sum(0) / gm.weights[comp].sum()
        dist = [float((ClassifierGuidance(base, exact_classifier(gm, sch), sch, scale=sc)(x, 0.5, labels=y)
                       - class_mean).norm(dim=1).mean()) for sc in (0.0, 0.5, 1.0)]
        # scale 1 is the exact conditional posterior mean (previous test); larger scales overshoot
        assert dist[0] > dist[1] > dist[2], dist
        assert dist[2] < 0.75 * dist[0]  # a substantial move (class 1 has two components, so not to 0)


# -- dynamic thresholding --------------------------------------------------------------------

def reference_threshold(x: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's rule written out in float64 with a hand-made quantile (linear interpolation)."""
    flat = x.reshape(x.shape[0], -1).to(F64)
    out = []
    for row in flat:
        a = row.abs().sort().values
        pos = ratio * (a.numel() - 1)
        lo = int(math.floor(pos))
        q = a[lo] + (pos - lo) * (a[min(lo + 1, a.numel() - 1)] - a[lo])
        s = max(float(q), max_value)
        out.append(row.clamp(-s, s) * max_value / s)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dynamic_threshold_values_in_low_precision(dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.stack([torch.linspace(-3, 3, 300),                  # quantile ~2.98 -> rescaled into [-1, 1]
                     0.5 * torch.rand(300, generator=g) - 0.25,     # quantile < 1 -> s = 1: untouched
                     4 * torch.randn(300, generator=g)]).reshape(3, 3, 10, 10).to(dtype)
    got = dynamic_threshold(x, ratio=0.995)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.abs().max() <= 1.0
    want = reference_threshold(x, 0.995, 1.0)
    # compared with the float64 rule applied to the same rounded inputs: one rounding of the output
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert torch.allclose(got.to(F64), want, rtol=tol, atol=tol), (got.to(F64) - want).abs().max()
    assert torch.equal(got[1], x[1])  # inside [-1, 1] nothing changes
    assert float(got[0].abs().max()) == pytest.approx(1.0, abs=tol)  # the top 0.5% are clipped to +-1


def test_dynamic_threshold_max_value():
    x = torch.tensor([[-6.0, -2.0, 0.0, 2.0, 6.0, 1.0]])
    got = dynamic_threshold(x, ratio=0.5, max_value=2.0)
    # |x| sorted: 0 1 2 2 6 6 -> median 2 -> s = clamp(2, 1, max_value=2) = 2: clamp to [-2, 2], divide by 2
    assert torch.equal(got, torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0, 0.5]]))
    # the cap: the median 2 is cut to max_value 1.5 (diffusers' sample_max_value)
    capped = dynamic_threshold(x, ratio=0.5, max_value=1.5)
    assert torch.allclose(capped, torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0, 1 / 1.5]]))


def test_thresholded_wrapper_and_the_sampler_switch():
    sch = LinearVP()
    gm = GaussianMixture(torch.full((1, D), 1.5, dtype=F64), torch.tensor([0.5]))
    exact = gm.denoiser(sch)
    x = torch.randn(4, D, dtype=F64, generator=torch.Generator().manual_seed(9))
    wrapped = Thresholded(exact, ratio=0.9)
    assert torch.equal(wrapped(x, 0.2), dynamic_threshold(exact(x, 0.2), 0.9))
    assert wrapped(x, 0.2).abs().max() <= 1.0 < exact(x, 0.2).abs().max()
    a = fewstep.sample(exact, x, sch, solver="dpmpp_2m", steps=6, thresholding={"ratio": 0.9})
    b = fewstep.sample(wrapped, x, sch, solver="dpmpp_2m", steps=6)
    c = fewstep.sample(exact, x, sch, solver="dpmpp_2m", steps=6)
    assert torch.equal(a.x, b.x) and a.nfe == 6
    assert a.x.abs().max() <= 1.0 < c.x.abs().max()  # the final step returns a thresholded x0


def test_memo_denoiser_answers_only_exact_repeats_from_memory():
    """A repeated call (same x, t and conditions, bit for bit) is answered from memory with a copy; any
    difference in x, t, a condition or the dtype calls the model; the oldest calls are forgotten first."""
    calls = []

    def model(x, t, labels=None):
        calls.append(1)
        return x * 2 + (0 if labels is None else labels[:, None])
    memo = MemoDenoiser(model, size=3)
    x, t, y = torch.randn(4, D, dtype=F64), torch.full((4,), 0.5, dtype=F64), torch.tensor([0, 1, 2, 3])
    first = memo(x, t, labels=y)
    again = memo(x, t, labels=y)
    assert torch.equal(first, again) and len(calls) == 1 and memo.hits == 1
    again.add_(1.0)  # the caller's copy: the memory is untouched
    assert torch.equal(memo(x, t, labels=y), first) and len(calls) == 1
    for changed in ((x + 1e-12, t, y), (x, t + 1e-12, y), (x, t, y.flip(0)), (x.float(), t, y)):
        memo(changed[0], changed[1], labels=changed[2])
    assert len(calls) == 5
    memo(x, t, labels=y)  # forgotten: four other calls since, memory of three
    assert len(calls) == 6
    with pytest.raises(ValueError, match="size"):
        MemoDenoiser(model, size=0)
