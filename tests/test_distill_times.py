"""Distillation times on every schedule (fewstep.distill.times): fractions of the training range,
linear in t for VP / flow schedules, Karras (rho = 7) sigmas for EDM, and refusal of others."""
import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.data.toys import ring8
from fewstep.distill import GuidedDistillLoss, ProgressiveLoss, student_grid
from fewstep.distill.dmd import DMDLoss, generator_times
from fewstep.distill.times import dm_time_range, encoder_times, training_times
from fewstep.schedules import EDM, CosineVP, DiscreteVP, NoiseSchedule, RectifiedFlow

SMIN, SMAX = 0.002, 80.0


def karras(u):
    """EDM eq. 5 written out: sigma at fraction u (u = 1: sigma_max, u = 0: sigma_min)."""
    return (SMIN ** (1 / 7) + u * (SMAX ** (1 / 7) - SMIN ** (1 / 7))) ** 7


def test_edm_generator_and_student_times_are_karras_spaced():
    t = generator_times(EDM(SMIN, SMAX), 4)
    expected = torch.tensor([karras(u) for u in (1.0, 0.75, 0.5, 0.25)], dtype=torch.float64)
    assert torch.allclose(t, expected, rtol=1e-12)  # 80, 17.5, 2.5, 0.17 -- not 80, 60, 40, 20
    assert float(t[-1]) < 0.5
    steps = torch.diff(t ** (1 / 7))
    assert torch.allclose(steps, steps[0].expand(3), rtol=1e-9)  # equal steps in sigma^(1/rho)
    grid = student_grid(EDM(SMIN, SMAX), 4)
    assert torch.equal(grid[:-1], t) and grid[-1] == 0
    enc = encoder_times(EDM(SMIN, SMAX), 4)
    assert abs(float(enc[0]) - SMIN) < 1e-12 and abs(float(enc[-1]) - SMAX) < 1e-9
    assert torch.allclose(enc[1:4], t.flip(0)[:3])


def test_t_linear_schedules_keep_fractions_of_t():
    for sch in (CosineVP(), RectifiedFlow(), DiscreteVP.from_name("linear", 1000)):
        quarters = torch.tensor([1, 0.75, 0.5, 0.25], dtype=torch.float64)
        assert torch.allclose(generator_times(sch, 4), sch.t_max * quarters)
        assert torch.allclose(student_grid(sch, 2), sch.t_max * torch.tensor([1, 0.5, 0], dtype=torch.float64))
        lo, hi = dm_time_range(sch)
        assert abs(lo - 0.02 * sch.t_max) < 1e-12 and abs(hi - 0.98 * sch.t_max) < 1e-12


def test_edm_dm_noise_reaches_small_sigma():
    lo, hi = dm_time_range(EDM(SMIN, SMAX))
    assert abs(lo - karras(0.02)) < 1e-12 and abs(hi - karras(0.98)) < 1e-9
    assert lo < 0.01 and hi > 60  # a fraction of sigma in [0.002, 80] would never go below 1.6
    spec = ring8()
    gmm = GaussianMixture(spec["means"], spec["stds"])
    loss = DMDLoss(lambda x, t, labels=None: gmm.denoiser(EDM(SMIN, SMAX))(x, t), EDM(SMIN, SMAX), "x0")
    torch.manual_seed(0)
    t = loss.dm_times(20000, "cpu")
    assert float(t.min()) >= lo and float(t.max()) <= hi
    assert (t < 0.1).float().mean() > 0.1  # measured 0.25: plenty of low-noise samples
    med = float(t.median())
    assert 0.7 * karras(0.5) < med < 1.4 * karras(0.5), med  # median sigma(0.5) = 2.5, not 40


def test_edm_training_times_follow_the_karras_fractions():
    torch.manual_seed(0)
    t = training_times(EDM(SMIN, SMAX), 20000, "cpu")
    assert float(t.min()) >= SMIN and float(t.max()) <= SMAX
    u = (t ** (1 / 7) - SMIN ** (1 / 7)) / (SMAX ** (1 / 7) - SMIN ** (1 / 7))  # EDM eq. 5 inverted
    for q in (0.25, 0.5, 0.75):  # u ~ U[0, 1]: its q-quantile is q (MC error ~0.003 at n = 20k)
        assert abs(float(u.quantile(q)) - q) < 0.015, q
    assert float(t.median()) < 5  # sigma uniform on [0.002, 80] would have median 40


def test_progressive_teacher_steps_meet_on_the_2n_grid_on_edm():
    """The student's step from fraction i/N to (i-1)/N is two teacher steps through fraction
    (2i-1)/(2N): on EDM all three times are points of the Karras grids of N and 2N steps."""
    sch = EDM(SMIN, SMAX)
    calls = []

    def teacher(x, t, labels=None):
        calls.append(t.clone())
        return torch.zeros_like(x)
    loss = ProgressiveLoss(teacher, sch, 4, "x0", w_range=None)
    fine = student_grid(sch, 8)
    torch.manual_seed(0)
    loss(lambda x, t, labels=None: torch.zeros_like(x), torch.randn(64, 2))
    t_first, t_mid = calls[0], calls[1]
    for a, b in zip(t_first.tolist(), t_mid.tolist()):
        k = min(range(9), key=lambda j: abs(float(fine[j]) - a))
        assert a == pytest.approx(float(fine[k]), rel=1e-12) and k % 2 == 0 and k < 8  # a 4-step grid point
        assert b == pytest.approx(float(fine[k + 1]), rel=1e-12)  # the 8-step point after it


@pytest.mark.parametrize("schedule", [CosineVP(), EDM(SMIN, SMAX)], ids=["cosine", "edm"])
def test_encoder_rounds_step_up_the_encoder_grid_through_its_2n_points(schedule):
    """direction='encode': student step i of N goes from encoder point N-i up to N-i+1 (the grid
    runs t_min -> t_max), through the 2N-step encoder grid's point between them."""
    n = 4
    loss = ProgressiveLoss(lambda x, t, labels=None: x, schedule, n, "x0", w_range=None, direction="encode")
    coarse, fine = encoder_times(schedule, n), encoder_times(schedule, 2 * n)
    for i in range(1, n + 1):
        t, t_mid, t_next = (float(v) for v in loss.step_times(torch.tensor([i])))
        k = n - i
        assert t == pytest.approx(float(coarse[k]), rel=1e-12) and t_next == pytest.approx(float(coarse[k + 1]), rel=1e-12)
        assert t_mid == pytest.approx(float(fine[2 * k + 1]), rel=1e-12) and t < t_mid < t_next


def test_schedules_without_defined_fractions_are_refused():
    class Custom(NoiseSchedule):
        t_min, t_max = 0.01, 5.0

        def log_alpha(self, t):
            return -torch.as_tensor(t, dtype=torch.float64)

    for make in (lambda: generator_times(Custom(), 2), lambda: student_grid(Custom(), 2),
                 lambda: DMDLoss(lambda x, t, labels=None: x, Custom(), "x0"),
                 lambda: GuidedDistillLoss(lambda x, t, labels=None: x, Custom(), "x0", null_class=0),
                 lambda: ProgressiveLoss(lambda x, t, labels=None: x, Custom(), 2, "x0")):
        with pytest.raises(ValueError, match="distillation times are defined for .* not Custom"):
            make()
