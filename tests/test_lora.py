"""LoRA students of pipeline teachers (fewstep.recipes.lora, issue 22): the adapter starts at zero over the teacher's
own (shared, frozen) weights, trains alone, and its export is a pytorch_lora_weights.safetensors that stock
diffusers' load_lora_weights loads into the teacher's pipeline; with the exported scheduler, the stock call equals
fewstep's student sampler to 1e-4 from the same latents."""
import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_textbed import TINY_SD, TINY_SD3, TINY_VAE, tiny_data  # noqa: E402

from fewstep.distill import GuidedDistillLoss, NetX0, generator_times, sample_student  # noqa: E402
from fewstep.distill.dmd import DMDLoss, FakeScore  # noqa: E402
from fewstep.distill.pairs import DMDData  # noqa: E402
from fewstep.recipes.lora import (GUIDANCE_WEIGHTS, LORA_WEIGHTS, LoraNet, cli_command, export_lora,  # noqa: E402
                                  load_lora_student, lora_exporter, memory_plan, merged_student, with_lora)
from fewstep.recipes.teachers import teacher_from  # noqa: E402
from fewstep.recipes.textbed import run_sd, run_sd3, run_vae  # noqa: E402
from fewstep.train import train  # noqa: E402

PROMPTS = ["a thick seven", "a thin two slanted left", "a handwritten zero"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    run_vae(out, TINY_VAE, data=tiny_data, progress=False)
    return run_sd(out, TINY_SD, data=tiny_data, progress=False), run_sd3(out, TINY_SD3, data=tiny_data, progress=False)


def _latents(teacher, n=2):
    return torch.randn(n, *teacher.image_shape, generator=torch.Generator().manual_seed(0))


def _ids(teacher, prompts):
    return torch.tensor([teacher.prompts.index(p) for p in prompts])


def _card_pipe(folder, **extra):
    """Run the model card's stock diffusers code (README.md) and return its ``pipe``."""
    code = re.search(r"```python\n(.*?)```", (Path(folder) / "README.md").read_text(), re.S).group(1)
    if extra:  # SD3 without T5: the pipeline folder has no third text encoder
        code = code.replace('.from_pretrained("', '.from_pretrained(**EXTRA, pretrained_model_name_or_path="', 1)
    scope = {"prompt": PROMPTS[:1], "EXTRA": extra}
    import diffusers.utils.logging as dlog
    dlog.disable_progress_bar()
    exec(code, scope)
    scope["pipe"].set_progress_bar_config(disable=True)
    return scope["pipe"]


def _base_pairs(student, teacher):
    """(student base tensor, teacher tensor) for every base weight: peft's base_layer.* is the teacher's *."""
    teacher_params = dict(teacher.net.unet.named_parameters())
    return [(p, teacher_params[n.replace(".base_layer", "")]) for n, p in student.unet.named_parameters()
            if n.replace(".base_layer", "") in teacher_params]


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_lora_student_starts_as_the_teacher_over_its_shared_frozen_weights(pipelines, one_thread):
    t = teacher_from(pipelines[0], PROMPTS)
    x, tt, labels = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        before = t.net(x, tt, labels)
    s = with_lora(t.net, 4)
    assert isinstance(s, LoraNet) and s.lora["targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    with torch.no_grad():
        assert torch.equal(s(x, tt, labels), before)  # lora_B starts at zero
        assert torch.equal(t.net(x, tt, labels), before)  # the teacher's module carries no adapter
    assert not any("lora" in k for k in t.net.unet.state_dict())
    pairs = _base_pairs(s, t)
    assert len(pairs) == len(list(t.net.unet.parameters()))  # every teacher weight is a base weight of the student
    assert all(a.data_ptr() == b.data_ptr() and not a.requires_grad for a, b in pairs)
    trained = [n for n, p in s.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained) and set(trained) == s.trained_names
    # the training loop's EMA (a deepcopy) and a round's next student share the base too; requires_grad_(True)
    # (what the recipes call on a copy) never unfreezes the teacher's weights
    ema = copy.deepcopy(s).requires_grad_(True)
    assert all(a.data_ptr() == b.data_ptr() and not a.requires_grad for a, b in _base_pairs(ema, t))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.trained_parameters(), s.trained_parameters()))
    # parameter counts and memory: trained = the adapters, frozen = the teacher's weights, held once
    fake = with_lora(t.net, 4)
    plan = memory_plan(t, s, fake)
    n_lora = sum(p.numel() for p in s.trained_parameters())
    assert plan["trained_params"] == {"student": n_lora, "fake": n_lora}
    assert plan["frozen"] == plan["teacher_params"] == sum(p.numel() for p in t.net.parameters())
    assert plan["total_bytes"] == 4 * (plan["frozen"] + 5 * 2 * n_lora) < plan["full_finetune_bytes"]
    assert plan["summary"].startswith("training ") and "\n" not in plan["summary"]
    # lora_A's random init depends on the seed only (a resumed run rebuilds the same student)
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(with_lora(t.net, 4).trained_parameters(), s.trained_parameters()))
    # more targets: feed-forward and convolutions
    assert sum(p.numel() for p in with_lora(t.net, 4, targets="all").trained_parameters()) > 2 * n_lora


def test_bad_lora_settings_get_one_line_errors(pipelines):
    t = teacher_from(pipelines[0], PROMPTS)
    for rank in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="LoRA rank must be an integer >= 1"):
            with_lora(t.net, rank)
    with pytest.raises(ValueError, match="unknown LoRA targets 'convs'"):
        with_lora(t.net, 4, targets="convs")
    with pytest.raises(ValueError, match=r"\['add_q_proj'\] match no layer"):
        with_lora(t.net, 4, targets=("to_q", "add_q_proj"))
    s = with_lora(t.net, 4)
    with pytest.raises(ValueError, match="already carries a LoRA adapter"):
        with_lora(s, 4)
    with pytest.raises(ValueError, match="export_lora writes LoRA students"):
        export_lora(t, t.net, "unused", steps=1, info={})
    with pytest.raises(ValueError, match="not a LoRA export"):
        load_lora_student(t, pipelines[0])
    with pytest.raises(ValueError, match="LoRA students are for diffusers pipeline teachers"):
        with_lora(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="guided LoRA needs a UNet2DConditionModel teacher"):
        lora_exporter(teacher_from(pipelines[1], PROMPTS), 4, guided=True)


def test_dmd_lora_student_exports_a_lora_stock_diffusers_loads(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[0], PROMPTS)
    teacher_state = _snapshot(t.net.unet)
    generator, fake = with_lora(t.net, 4), FakeScore(with_lora(t.net, 4).train())
    g = torch.Generator().manual_seed(1)
    pairs = {"z": torch.randn(6, *t.image_shape, generator=g), "labels": torch.arange(6) % 3,
             "x_ref": torch.randn(6, *t.image_shape, generator=g)}
    loss = DMDLoss(t.net, t.schedule, t.prediction, real_w=1.0, lambda_reg=0.25, null_class=t.null_class,
                   times=t.generator_times(1))
    result = train(loss, {"generator": generator.train(), "fake": fake}, DMDData(pairs), steps=3,
                   out_dir=tmp_path / "run", lr=1e-2, batch_size=4, ema_decay=0.5, ckpt_every_minutes=None,
                   sample_every_minutes=None, progress=False)
    ema = result.emas["generator"]
    # only the adapters trained: the teacher is unchanged, and the EMA holds no second base
    assert all(torch.equal(v, teacher_state[k]) for k, v in t.net.unet.state_dict().items())
    assert all(a.data_ptr() == b.data_ptr() for a, b in _base_pairs(ema, t) + _base_pairs(result.emas["fake"].net, t))
    assert any(p.abs().max() > 0 for n, p in ema.named_parameters() if ".lora_B." in n)
    # the Stage's save / load pair: export_lora, plus the last FID probe of the run as the measured quality
    fid_log = tmp_path / "run" / "fid.jsonl"
    fid_log.write_text(json.dumps({"step": 3, "n": 8, "fid": 123.456, "class_accuracy": 0.25}) + "\n")
    stage = lora_exporter(t, 1, fid_log=fid_log)
    info = {"recipe": "tiny-dmd-lora", "real_w": 1.0, "train_steps": 3, "command": "fewstep distill dmd --lora-rank 4",
            "schedule": {"kind": "unused"}}
    folder = stage["save"](ema, tmp_path / "export", info)
    # one folder, both forms: the LoRA for the teacher's pipeline, and the merged whole pipeline
    assert {LORA_WEIGHTS, "scheduler", "README.md", "fewstep.json", "model_index.json", "unet"} <= \
        {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "rank 4" in card and "--lora-rank 4" in card and "guidance_scale=1.0" in card and "123.5" in card
    assert json.loads((folder / "fewstep.json").read_text())["lora"]["rank"] == 4
    # the model card's stock code: the teacher's pipeline, load_lora_weights, the exported DDIM scheduler
    stock = _card_pipe(folder)
    assert type(stock.scheduler).__name__ == "DDIMScheduler" and stock.unet.peft_config
    lat, prompts = _latents(t), ["a thick seven", "a handwritten zero"]
    images = stock(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    for net in (ema, stage["load"](folder)):
        x0 = NetX0(net, t.schedule, t.prediction)(lat, generator_times(t.schedule, 1).expand(2), _ids(t, prompts))
        assert ((t.decode(x0) + 1) / 2 - images).abs().max() < 1e-4
    # the merged whole-network form (what export_student writes) computes the same, on its own weights
    merged = merged_student(ema)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        x, tt, labels = torch.randn(2, *t.image_shape), torch.tensor([0.4, 0.9]), torch.tensor([0, 2])
        torch.testing.assert_close(merged(x, tt, labels), ema(x, tt, labels), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, teacher_state[k]) for k, v in t.net.unet.state_dict().items())
    # and the trained adapter made a difference
    with torch.no_grad():
        x0_teacher = NetX0(t.net, t.schedule, t.prediction)(lat, generator_times(t.schedule, 1).expand(2),
                                                           _ids(t, prompts))
    assert ((t.decode(x0_teacher) + 1) / 2 - images).abs().max() > 1e-3


def test_lora_runs_resume_exactly_over_the_shared_base(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[0], PROMPTS)
    g = torch.Generator().manual_seed(4)
    pairs = {"z": torch.randn(4, *t.image_shape, generator=g), "labels": torch.arange(4) % 3,
             "x_ref": torch.randn(4, *t.image_shape, generator=g)}
    loss = DMDLoss(t.net, t.schedule, t.prediction, real_w=1.0, null_class=t.null_class, times=t.generator_times(1))

    def run(out, steps, resume):
        nets = {"generator": with_lora(t.net, 2).train(), "fake": FakeScore(with_lora(t.net, 2).train())}
        return train(loss, nets, DMDData(pairs), steps=steps, out_dir=out, lr=1e-2, batch_size=2, ema_decay=0.5,
                     ckpt_every_steps=1, ckpt_every_minutes=None, sample_every_minutes=None, progress=False,
                     resume=resume).emas["generator"].state_dict()

    run(tmp_path / "a", 1, False)
    resumed, fresh = run(tmp_path / "a", 2, True), run(tmp_path / "b", 2, False)
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_guided_lora_student_trains_its_guidance_layer_and_exports_it(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[0], PROMPTS)
    s = with_lora(t.net, 2, alpha=4.0, targets="all", w_input=256)  # feed-forward and convolution LoRA too
    assert s.use_w and "unet.time_embedding.cond_proj.weight" in s.trained_names
    x, tt, labels = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(s(x, tt, labels, torch.tensor([0.0, 3.0])), t.net(x, tt, labels))
    loss = GuidedDistillLoss(t.net, t.schedule, t.prediction, null_class=t.null_class)
    opt = torch.optim.Adam([p for p in s.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        opt.zero_grad()
        loss(s, (torch.randn(4, *t.image_shape, generator=g), torch.arange(4) % 3)).mean().backward()
        opt.step()
    assert s.unet.time_embedding.cond_proj.weight.abs().max() > 0
    folder = export_lora(t, s.eval(), tmp_path / "guided", steps=4, info={"recipe": "tiny-guided-lora-4",
                                                                           "w_range": [0.0, 4.0]})
    assert (folder / GUIDANCE_WEIGHTS).is_file() and "time_cond_proj_dim" in (folder / "README.md").read_text()
    stock = _card_pipe(folder)
    assert stock.unet.config.time_cond_proj_dim == 256
    lat, prompts, w = _latents(t), ["a thick seven", "a thin two slanted left"], 1.5
    images = stock(prompts, num_inference_steps=4, guidance_scale=1 + w, latents=lat, output_type="pt").images
    for net in (s, load_lora_student(t, folder)):
        x0 = NetX0(net, t.schedule, t.prediction)
        den = lambda x, tt, labels: x0(x, tt, labels, torch.full((x.shape[0],), w))  # noqa: E731
        with torch.no_grad():
            ours = sample_student(den, lat, t.schedule, 4, cond={"labels": _ids(t, prompts)}).x
        assert ((t.decode(ours) + 1) / 2 - images).abs().max() < 1e-4


def test_sd3_lora_student_exports_a_one_step_flow_lora(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[1], PROMPTS)
    s = with_lora(t.net, 4)
    assert "add_q_proj" in s.lora["targets"]  # the context stream's attention too
    assert all(a.data_ptr() == b.data_ptr() for a, b in _base_pairs(s, t))
    times = t.generator_times(1)
    opt = torch.optim.Adam(s.trained_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        opt.zero_grad()
        z, labels = torch.randn(4, *t.image_shape, generator=g), torch.arange(4) % 3
        s(z, times.expand(4), labels).pow(2).mean().backward()
        opt.step()
    folder = export_lora(t, s.eval(), tmp_path / "sd3", steps=1, info={"recipe": "tiny-sd3-lora", "real_w": 1.0})
    stock = _card_pipe(folder, text_encoder_3=None, tokenizer_3=None)
    assert type(stock.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    lat, prompts = _latents(t), ["a thick seven", "a thin two slanted left"]
    images = stock(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    with torch.no_grad():
        x0 = NetX0(s, t.schedule, t.prediction)(lat, times.expand(2), _ids(t, prompts))
    assert ((t.decode(x0) + 1) / 2 - images).abs().max() < 1e-4


def test_the_model_card_records_the_cli_command_line(monkeypatch):
    argv = ["/usr/local/bin/fewstep", "distill", "dmd", "--teacher", "my sd", "--lora-rank", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli_command() == "fewstep distill dmd --teacher 'my sd' --lora-rank 4"
    monkeypatch.setattr(sys, "argv", ["/x/site-packages/fewstep/__main__.py", "distill", "guided"])
    assert cli_command() == "fewstep distill guided"
    monkeypatch.setattr(sys, "argv", ["pytest", "tests"])
    assert cli_command() is None
