"""One object per model family (fewstep.diffusers.families), shared by FewstepScheduler and the adapters.

Each family's formulas are checked against diffusers' own schedulers, the independent oracle:
DDIM's pred_original_sample (VP), the rectified-flow identity x0 = x - sigma v and FlowMatchEuler's
timesteps (flow), EDMEulerScheduler's precondition_inputs / _noise / _outputs (EDM).
"""
from __future__ import annotations

import types

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)

import fewstep.diffusers as fd
import fewstep.diffusers.scheduler as scheduler_module
from fewstep.diffusers import DiffusersDenoiser, DiffusersNet, FewstepScheduler, family_of
from fewstep.diffusers.families import PREDICTION_OF, EDMFamily, FlowFamily, VPFamily, translate_config
from _tiny_models import tiny_unet


def fam(config):
    return family_of(translate_config(dict(config))[0])


def gen(seed):
    return torch.Generator().manual_seed(seed)


CONFIGS = {"vp": (lambda: DDPMScheduler(prediction_type="v_prediction").config, VPFamily),
           "flow": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0).config, FlowFamily),
           "unipc-flow": (lambda: UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0,
                                                         prediction_type="flow_prediction").config, FlowFamily),
           "edm": (lambda: EDMEulerScheduler(sigma_max=20.0).config, EDMFamily)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scheduler_and_adapters_use_one_family_object(name):
    make, cls = CONFIGS[name]
    config = make()
    fs = FewstepScheduler.from_config(config)
    den = DiffusersDenoiser(tiny_unet(), config)
    assert type(fs.family) is cls and type(den.family) is cls
    assert fs.schedule is fs.family.schedule and den.schedule is den.family.schedule
    if cls is not EDMFamily:
        assert type(DiffusersNet(tiny_unet(), config).family) is cls


def test_one_prediction_type_map():
    assert not hasattr(scheduler_module, "PREDICTION_TYPES")
    assert PREDICTION_OF == {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
    assert VPFamily.predictions == ("epsilon", "v_prediction", "sample")
    assert FlowFamily.predictions == ("flow_prediction",) and EDMFamily.predictions == ("epsilon", "v_prediction")
    for cls in (VPFamily, FlowFamily, EDMFamily):  # every allowed type has its fewstep name in the one map
        assert set(cls.predictions) <= set(PREDICTION_OF)
    with pytest.raises(ValueError, match=r"'sample' is not supported for the edm family; supported: epsilon, "
                                         r"v_prediction"):
        family_of({"family": "edm", "prediction_type": "sample"})
    assert fd.prediction_from_config(FlowMatchEulerDiscreteScheduler().config) == "flow"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_x0_and_timesteps_equal_ddims(prediction_type):
    ref = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    ref.set_timesteps(10)
    f = fam(ref.config)
    x = torch.randn(2, 3, 4, 4, generator=gen(0))
    out = torch.randn(2, 3, 4, 4, generator=gen(1))
    for k in (int(ref.timesteps[0]), int(ref.timesteps[5])):
        t = f.time(torch.tensor([k, k]))
        assert torch.allclose(t, torch.full((2,), (k + 1) / 1000, dtype=torch.float64))
        assert torch.allclose(f.timestep(t), torch.tensor([float(k)] * 2, dtype=torch.float64))
        a, s = f.alpha_sigma(torch.tensor([k, k]))
        assert torch.allclose(a ** 2, ref.alphas_cumprod[k].double().expand(2), rtol=1e-5)
        want = ref.step(out, k, x).pred_original_sample
        got = f.x0(out, x, a, s)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert f.init_noise_sigma(None) == ref.init_noise_sigma == 1.0


def test_flow_timesteps_x0_and_grid_ends_equal_flowmatch_euler():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    training = ref.sigmas.double().clone()  # the shifted training sigmas, before set_timesteps
    f = fam(ref.config)
    ends = f.grid_ends()
    assert abs(ends["t_min"] - float(training.min())) < 1e-6
    assert abs(ends["t_max"] - float(training[training < 1].max())) < 1e-6
    ref.set_timesteps(8)
    sig = ref.sigmas[:-1].double()
    assert torch.allclose(f.timestep(sig), ref.timesteps.double(), atol=1e-3)
    assert torch.allclose(f.time(ref.timesteps), sig, atol=1e-6)
    a, s = f.alpha_sigma(ref.timesteps)
    assert torch.allclose(a, 1 - sig, atol=1e-6) and torch.allclose(s, sig, atol=1e-6)
    x, v = torch.randn(8, 3, 2, 2, generator=gen(2)), torch.randn(8, 3, 2, 2, generator=gen(3))
    got = f.x0(v, x, 1 - sig, sig)
    # x = (1 - s) x0 + s noise and v = noise - x0  =>  x0 = x - s v
    assert torch.allclose(got, x - sig.float().view(-1, 1, 1, 1) * v, atol=1e-6)
    assert f.init_noise_sigma(None) == 1.0  # SD3 / Flux pipelines draw unit-variance latents
    with pytest.raises(ValueError, match="mu"):
        fam(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config).check_mu(None)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_preconditioning_equals_edm_euler(prediction_type):
    ref = EDMEulerScheduler(sigma_max=20.0, sigma_data=0.6, prediction_type=prediction_type)
    f = fam(ref.config)
    sig = torch.tensor([15.0, 1.0, 0.01], dtype=torch.float64)
    x, out = torch.randn(3, 2, 2, 2, generator=gen(4)), torch.randn(3, 2, 2, 2, generator=gen(5))
    col = sig.float().view(-1, 1, 1, 1)
    assert torch.allclose(f.scale_model_input(x, sig), ref.precondition_inputs(x, col), rtol=1e-6)
    assert torch.allclose(f.timestep(sig).float(), ref.precondition_noise(sig.float()), atol=1e-6)
    assert torch.allclose(f.time(f.timestep(sig)), sig)
    assert torch.allclose(f.x0(out, x, torch.ones(3, dtype=torch.float64), sig), ref.precondition_outputs(x, out, col),
                          rtol=1e-5, atol=1e-6)
    assert abs(f.init_noise_sigma(None) - ref.init_noise_sigma) < 1e-6
    assert f.initial_sigma(20.0) == 20.0


def test_edm_denoiser_applies_the_preconditioning():
    """DiffusersDenoiser on an EDM config: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    ref = EDMEulerScheduler(sigma_max=20.0, prediction_type="v_prediction")
    unet = tiny_unet()
    den = DiffusersDenoiser(unet, ref.config)
    x = torch.randn(2, 3, 8, 8, generator=gen(6)) * 5
    sig = torch.tensor([10.0, 0.3], dtype=torch.float64)
    col = sig.float().view(-1, 1, 1, 1)
    with torch.no_grad():
        got = den(x, sig)
        f = unet(ref.precondition_inputs(x, col), ref.precondition_noise(sig.float())).sample
    assert torch.allclose(got, ref.precondition_outputs(x, f, col), rtol=1e-5, atol=1e-5)


def test_helper_refuses_mu_for_a_model_without_dynamic_shifting():
    pipe = types.SimpleNamespace(unet=tiny_unet(), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="mu.*only meaningful for a flow-matching"):
        fd.sample(pipe, steps=2, batch_size=1, mu=0.5, progress=False)
