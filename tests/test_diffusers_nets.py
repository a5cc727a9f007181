"""DiffusersNet: diffusers UNets and SD3's transformer in fewstep's net contract net(x, t, labels, w).

Oracles: the wrapped diffusers model called by hand with the timestep, class labels or contexts the
contract promises (VP: k = (t - 1/N) N; flow: t * 1000), and the model itself for the guidance
input, which must change nothing until it is trained. Tiny random models, built offline.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       UNet2DConditionModel)
from safetensors.torch import load_file, save_file

from fewstep.diffusers import DiffusersNet, schedule_from_config
from fewstep.schedules import DiscreteVP, FlowMatching
from _tiny_models import tiny_unet

SCHEDULE = DiscreteVP.from_name("linear", 1000)
WS = (0.0, 0.5, 1.0, 3.0, 7.5)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cond_unet(**overrides):
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DConditionModel(**{**cfg, **overrides}).eval()


def sd3():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4).eval()


def perturb(module, seed=0):
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------
# time and labels reach the model as promised
# ---------------------------------------------------------------------------

def test_vp_net_feeds_the_discrete_timestep_and_class_labels():
    unet = tiny_unet(num_class_embeds=10)  # ten real classes, no null class
    net = DiffusersNet(unet, SCHEDULE)
    x = torch.randn(3, 3, 8, 8, generator=gen(0))
    t = torch.tensor([0.05, 0.5, 1.0], dtype=torch.float64)
    labels = torch.tensor([9, 0, 4])
    with torch.no_grad():
        got = net(x, t, labels)
        want = unet(x, torch.tensor([49.0, 499.0, 999.0]), class_labels=labels).sample  # k = 1000 t - 1
    assert torch.allclose(got, want, atol=1e-6)
    assert (got[0] - net(x, t, torch.tensor([8, 0, 4]))[0]).abs().max() > 1e-3  # class 9 is a class of its own


def test_net_from_a_scheduler_config_takes_its_family_and_prediction():
    unet = tiny_unet()
    net = DiffusersNet(unet, DDPMScheduler(prediction_type="v_prediction", num_train_timesteps=500).config)
    assert net.prediction == "v" and net.schedule.N == 500
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    with torch.no_grad():
        assert torch.allclose(net(x, torch.tensor([0.1, 0.9])), unet(x, torch.tensor([49.0, 449.0])).sample, atol=1e-6)
    flow = DiffusersNet(unet, FlowMatchEulerDiscreteScheduler(shift=3.0).config)  # a flow-matching UNet
    assert flow.prediction == "flow" and isinstance(flow.schedule, FlowMatching)
    with torch.no_grad():
        assert torch.allclose(flow(x, torch.tensor([0.25, 0.8])), unet(x, torch.tensor([250.0, 800.0])).sample,
                              atol=1e-6)


def test_sd3_transformer_as_a_flow_net():
    tr = sd3()
    ctx, pooled = torch.randn(3, 5, 16, generator=gen(2)), torch.randn(3, 8, generator=gen(3))
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    net = DiffusersNet(tr, cfg, label_context=ctx, pooled_context=pooled, null_class=2)
    x, labels = torch.randn(2, 4, 8, 8, generator=gen(4)), torch.tensor([1, 0])
    with torch.no_grad():
        got = net(x, torch.tensor([0.3, 0.7]), labels)
        want = tr(hidden_states=x, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=ctx[labels],
                  pooled_projections=pooled[labels]).sample
        assert torch.allclose(got, want, atol=1e-5)
        uncond = tr(hidden_states=x, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=ctx[[2, 2]],
                    pooled_projections=pooled[[2, 2]]).sample
        assert torch.allclose(net(x, torch.tensor([0.3, 0.7])), uncond, atol=1e-5)  # labels=None: the null row


def test_a_schedule_without_the_timestep_convention_gets_a_true_message():
    """The flow schedule alone does not say how the model's timestep is scaled: the error points at the
    scheduler config (schedule_from_config would return the very same FlowMatching)."""
    tr = sd3()
    ctx, pooled = torch.randn(2, 5, 16), torch.randn(2, 8)
    sch = schedule_from_config(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(TypeError, match=r"pipe\.scheduler\.config") as info:
        DiffusersNet(tr, sch, label_context=ctx, pooled_context=pooled)
    assert "schedule_from_config" not in str(info.value)
    with pytest.raises(ValueError, match="EDM"):
        DiffusersNet(tiny_unet(), EDMEulerScheduler().config)


# ---------------------------------------------------------------------------
# the null class is explicit
# ---------------------------------------------------------------------------

def test_null_class_is_explicit():
    unet = tiny_unet(num_class_embeds=10)
    net = DiffusersNet(unet, SCHEDULE)
    assert net.null_class is None  # not class 9 behind the user's back
    x = torch.randn(2, 3, 8, 8, generator=gen(5))
    with pytest.raises(ValueError, match="no null class.*null_class="):
        net(x, 0.5)
    with_null = DiffusersNet(unet, SCHEDULE, null_class=0)
    with torch.no_grad():
        null = unet(x, torch.tensor([499.0]), class_labels=torch.zeros(2).long()).sample
        assert torch.allclose(with_null(x, 0.5), null, atol=1e-6)
    for bad in (10, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"null_class must be a class id in 0\.\.9"):
            DiffusersNet(unet, SCHEDULE, null_class=bad)
    with pytest.raises(ValueError, match="takes no class labels"):
        DiffusersNet(tiny_unet(), SCHEDULE, null_class=0)
    ctx = torch.randn(4, 3, 12, generator=gen(6))
    assert DiffusersNet(cond_unet(), SCHEDULE, label_context=ctx).null_class is None
    assert DiffusersNet(cond_unet(), SCHEDULE, label_context=ctx, null_class=3).null_class == 3


def test_labels_out_of_range_and_labels_for_an_unconditional_model():
    x = torch.randn(2, 3, 8, 8)
    net = DiffusersNet(tiny_unet(num_class_embeds=10), SCHEDULE)
    with pytest.raises(ValueError, match=r"class 10.*10 class embeddings.*0\.\.9"):
        net(x, 0.5, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"class -1"):
        net(x, 0.5, torch.tensor([-1, 2]))
    ctx_net = DiffusersNet(cond_unet(), SCHEDULE, label_context=torch.randn(4, 3, 12))
    with pytest.raises(ValueError, match=r"class 4.*4 class embeddings"):
        ctx_net(x, 0.5, torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="takes no class labels"):
        DiffusersNet(tiny_unet(), SCHEDULE)(x, 0.5, torch.tensor([1, 2]))


def test_label_context_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"label_context has shape \(4, 3, 10\).*\(K, seq, 12\)"):
        DiffusersNet(cond_unet(), SCHEDULE, label_context=torch.randn(4, 3, 10))
    with pytest.raises(ValueError, match="pass label_context"):
        DiffusersNet(cond_unet(), SCHEDULE)
    with pytest.raises(ValueError, match="no cross-attention"):
        DiffusersNet(tiny_unet(), SCHEDULE, label_context=torch.randn(4, 3, 12))
    with pytest.raises(ValueError, match=r"pooled_context of shape \(3, 8\)"):
        DiffusersNet(sd3(), FlowMatchEulerDiscreteScheduler().config, label_context=torch.randn(3, 5, 16))


# ---------------------------------------------------------------------------
# with_w_input: equal at init for every w, then a trainable, saved w input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [None, 10], ids=["unconditional", "class-conditional"])
def test_with_w_input_on_a_unet2dmodel(classes, tmp_path):
    unet = tiny_unet(num_class_embeds=classes) if classes else tiny_unet()
    teacher = DiffusersNet(unet, SCHEDULE)
    student = teacher.with_w_input()
    assert student.use_w and not teacher.use_w and student.unet is not teacher.unet
    x = torch.randn(2, 3, 8, 8, generator=gen(7))
    t = torch.tensor([0.2, 0.9])
    labels = torch.tensor([9, 3]) if classes else None
    with torch.no_grad():
        ref = teacher(x, t, labels)
        for w in WS:
            assert torch.equal(student(x, t, labels, torch.full((2,), w)), ref), w
        perturb(student.w_embedding)
        outs = [student(x, t, labels, w) for w in WS]
    assert min((a - b).abs().max() for a, b in zip(outs, outs[1:])) > 1e-4  # every w gives its own output
    with torch.no_grad():
        assert torch.equal(teacher(x, t, labels), ref)  # the teacher is untouched
        # the UNet called without the net's w: the hook adds nothing
        assert torch.equal(student.unet(x, torch.tensor([199.0, 899.0]), class_labels=labels).sample, ref)
    # saved and loaded with the net
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "s.safetensors"))
    state = load_file(str(tmp_path / "s.safetensors"))
    assert any(k.startswith("w_embedding.") for k in state)
    fresh = DiffusersNet(tiny_unet(num_class_embeds=classes) if classes else tiny_unet(), SCHEDULE).with_w_input()
    fresh.load_state_dict(state)
    clone = copy.deepcopy(student)  # a copy has its own w embedding (the hook follows the copy)
    with torch.no_grad():
        for w, out in zip(WS, outs):
            assert torch.equal(fresh(x, t, labels, w), out)
            assert torch.equal(clone(x, t, labels, w), out)
        perturb(clone.w_embedding, seed=1)
        assert torch.equal(student(x, t, labels, WS[-1]), outs[-1])  # the original keeps its own
        assert (clone(x, t, labels, WS[-1]) - outs[-1]).abs().max() > 1e-4


def test_gradient_reaches_the_w_embedding():
    student = DiffusersNet(tiny_unet(), SCHEDULE).with_w_input()
    x = torch.randn(2, 3, 8, 8, generator=gen(8))
    student(x, torch.tensor([0.3, 0.6]), None, torch.tensor([1.0, 4.0])).square().sum().backward()
    last = student.w_embedding.mlp[2]
    assert last.weight.grad is not None and last.weight.grad.abs().max() > 0
    assert last.bias.grad.abs().max() > 0
    assert all(p.requires_grad for p in student.w_embedding.parameters())
    names = {n for n, _ in student.named_parameters()}
    assert {"w_embedding.mlp.0.weight", "w_embedding.mlp.2.weight"} <= names  # an optimiser over parameters() has it


def test_with_w_input_on_sd3_adds_to_the_time_text_embedding():
    ctx, pooled = torch.randn(3, 5, 16, generator=gen(9)), torch.randn(3, 8, generator=gen(10))
    teacher = DiffusersNet(sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0).config, label_context=ctx,
                           pooled_context=pooled, null_class=2)
    student = teacher.with_w_input()
    assert student.null_class == 2 and student.prediction == "flow"
    x, t, labels = torch.randn(2, 4, 8, 8, generator=gen(11)), torch.tensor([0.3, 0.8]), torch.tensor([0, 1])
    with torch.no_grad():
        ref = teacher(x, t, labels)
        for w in WS:
            assert torch.equal(student(x, t, labels, w), ref)
        perturb(student.w_embedding)
        assert (student(x, t, labels, 0.0) - student(x, t, labels, 3.0)).abs().max() > 1e-4


def test_with_w_input_on_a_unet2dconditionmodel_stays_a_stock_diffusers_model():
    ctx = torch.randn(4, 3, 12, generator=gen(12))
    teacher = DiffusersNet(cond_unet(), SCHEDULE, label_context=ctx, null_class=3)
    student = teacher.with_w_input(time_cond_proj_dim=32)
    assert student.w_embedding is None and student.unet.config.time_cond_proj_dim == 32
    assert student.null_class == 3
    x, t, labels = torch.randn(2, 3, 8, 8, generator=gen(13)), torch.tensor([0.4, 0.7]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = teacher(x, t, labels)
        for w in WS:
            assert torch.allclose(student(x, t, labels, w), ref, atol=1e-6)


def test_w_is_required_exactly_when_there_is_a_w_input():
    net = DiffusersNet(tiny_unet(), SCHEDULE)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="no guidance input"):
        net(x, 0.5, None, 1.0)
    with pytest.raises(ValueError, match="pass w"):
        net.with_w_input()(x, 0.5)
    with pytest.raises(ValueError, match=r"w must be a scalar or have shape \(2,\)"):
        net.with_w_input()(x, 0.5, None, torch.ones(3))


def test_a_unet2dmodel_student_learns_w_in_guided_stage1(tmp_path):
    """Through the one training loop: the w embedding leaves zero, and the EMA copy's output follows its
    own w embedding (the hook belongs to each copy)."""
    from fewstep.distill import GuidedDistillLoss, with_w_input
    from fewstep.train import train
    teacher = DiffusersNet(tiny_unet(num_class_embeds=4, in_channels=1, out_channels=1), SCHEDULE, null_class=3)
    student = with_w_input(teacher)
    data = (torch.randn(16, 1, 8, 8, generator=gen(14)).clamp(-1, 1), torch.randint(0, 3, (16,), generator=gen(15)))
    torch.manual_seed(0)
    r = train(GuidedDistillLoss(teacher, SCHEDULE, "eps", null_class=3), student, data, steps=2,
              out_dir=tmp_path, batch_size=4, lr=1e-3, ckpt_every_minutes=None, progress=False, ema_decay=0.9)
    assert r.step == 2 and r.model.w_embedding.mlp[2].weight.abs().sum() > 0
    x, t, y = torch.randn(2, 1, 8, 8, generator=gen(16)), torch.tensor([0.5, 0.5]), torch.tensor([0, 1])
    with torch.no_grad():
        for net in (r.model, r.ema):
            assert (net(x, t, y, 0.0) - net(x, t, y, 4.0)).abs().max() > 1e-4
        ema_copy = copy.deepcopy(r.ema)
        ema_copy.w_embedding.load_state_dict(r.model.w_embedding.state_dict())
        ema_copy.unet.load_state_dict(r.model.unet.state_dict())
        assert torch.equal(ema_copy(x, t, y, 4.0), r.model(x, t, y, 4.0))
