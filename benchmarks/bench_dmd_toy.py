"""DMD's 2-D ablation (Yin et al. 2023, Fig. 3) on an 8-mode ring with the exact real score.

    python benchmarks/bench_dmd_toy.py [--steps 1500]

A small MLP diffusion model trained on the ring initialises the one-step generator and the
fake denoiser; the real denoiser is the mixture's exact one. Variants:
  real only            the distribution-matching gradient with the fake score taken as 0
  real + fake          DMD without regression (one fake update per generator update)
  real + fake + reg    DMD (regression weight 0.25 on pairs made by the exact ODE)
  DMD2 ratio 5         real + fake, 5 fake updates per generator update, no regression
Per variant: mode coverage (modes with >= 20% of a uniform share of the samples within
3 std), share of samples within 3 std of a mode, sliced Wasserstein distance to true samples,
and seconds. Results: benchmarks/results/dmd_toy.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fewstep.bench.machine import machine_info, machine_line
from fewstep.data.gmm import GaussianMixture
from fewstep.data.toys import ring8, toy_sampler
from fewstep.distill.dmd import DMDLoss, FakeScore, generator_sample
from fewstep.distill.pairs import DMDData
from fewstep.losses import DenoisingLoss
from fewstep.metrics import mode_stats, sliced_wasserstein
from fewstep.nets import MLP
from fewstep.sampling import sample
from fewstep.schedules import CosineVP
from fewstep.train import train

OUT = Path(__file__).parent / "results"
SCHEDULE = CosineVP()
SPEC = ring8()
GMM = GaussianMixture(**SPEC)
SIGMA_MAX = float(SCHEDULE.sigma(torch.tensor(SCHEDULE.t_max)))
VARIANTS = {
    "real only": dict(use_fake=False, lambda_reg=0.0),
    "real + fake": dict(lambda_reg=0.0),
    "real + fake + reg": dict(lambda_reg=0.25),
    "DMD2 ratio 5 (no reg)": dict(lambda_reg=0.0, fake_updates=5),
}


class ExactDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.d = GMM.denoiser(SCHEDULE)

    def forward(self, x, t, labels=None):
        return self.d(x, t, None)


def toy_teacher(out: Path, steps: int = 1500) -> nn.Module:
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=128, depth=3, num_classes=0)
    return train(DenoisingLoss(SCHEDULE, "x0", label_dropout=0), net, toy_sampler(SPEC, labelled=False),
                 steps=steps, out_dir=out, lr=2e-3, batch_size=256, warmup=50, ema_decay=0.99,
                 ckpt_every_minutes=None, progress=False).ema


def regression_set(n: int = 2000) -> dict:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g)
    x_ref = sample(ExactDenoiser(), z * SIGMA_MAX, SCHEDULE, solver="dpmpp_2m", steps=50).x
    return {"z": z, "labels": torch.zeros(n, dtype=torch.long), "x_ref": x_ref}


def run_variant(teacher, pairs, options: dict, steps: int, out: Path):
    torch.manual_seed(0)
    gen = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = FakeScore(copy.deepcopy(teacher).requires_grad_(True).train())
    loss = DMDLoss(ExactDenoiser(), SCHEDULE, "x0", **options)
    # one generator update per loop step whatever the ratio, so every variant gets `steps` G updates
    ratio = loss.fake_updates
    t0 = time.perf_counter()
    res = train(loss, {"generator": gen, "fake": fake}, DMDData(pairs), steps=steps * ratio, out_dir=out,
                lr={"generator": 1e-4, "fake": 1e-3}, batch_size=256, grad_clip=10.0,
                ema_decay={"generator": 0.0, "fake": 0.0}, ckpt_every_minutes=None, progress=False, log_every=50)
    return loss, res.models["generator"], time.perf_counter() - t0


@torch.no_grad()
def one_step(loss, generator, n: int = 4000, seed: int = 1) -> torch.Tensor:
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return generator_sample(loss.gen_x0(generator), z * SIGMA_MAX, None, SCHEDULE, loss.times)[1]


def scores(x: torch.Tensor, truth: torch.Tensor) -> dict:
    st = mode_stats(x, SPEC["means"], SPEC["stds"])
    return {"modes_covered": round(st["coverage"] * 8), "within_3sigma": st["within_3sigma"],
            "sliced_w2": sliced_wasserstein(x, truth), "counts": st["counts"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="generator updates per variant")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="dmd-toy-"))
    truth = GMM.sample(4000, torch.Generator().manual_seed(9))[0]
    teacher = toy_teacher(tmp / "teacher")
    pairs = regression_set()
    rows, samples = [], {}
    init_loss = DMDLoss(ExactDenoiser(), SCHEDULE, "x0")
    samples["generator at init (the teacher's x0 at t_max)"] = one_step(init_loss, teacher)
    rows.append({"variant": "generator at init", **scores(samples["generator at init (the teacher's x0 at t_max)"], truth),
                 "seconds": 0.0})
    for name, options in VARIANTS.items():
        loss, gen, secs = run_variant(teacher, pairs, options, args.steps, tmp / name.replace(" ", "_"))
        samples[name] = one_step(loss, gen)
        rows.append({"variant": name, **scores(samples[name], truth), "seconds": round(secs, 1)})
        print(json.dumps(rows[-1]))
    rows.append({"variant": "true samples (reference)", **scores(GMM.sample(4000, torch.Generator().manual_seed(10))[0],
                                                               truth), "seconds": 0.0})
    meta = {"command": "python benchmarks/bench_dmd_toy.py " + " ".join(argv or []), "generator_updates": args.steps,
            "machine": machine_line(),
            "date": machine_info()["day"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dmd_toy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| variant | modes covered (of 8) | within 3 std | sliced W2 to data | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['modes_covered']} | {r['within_3sigma']:.3f} | {r['sliced_w2']:.3f} | "
              f"{r['seconds']} |" for r in rows]
    (OUT / "dmd_toy.md").write_text("\n".join(lines) + "\n")
    plot(samples, truth, OUT / "dmd_toy.png")
    print("\n".join(lines))
    return 0


def plot(samples: dict, truth: torch.Tensor, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.4), sharex=True, sharey=True)
    for ax, (name, x) in zip(axes, samples.items()):
        ax.scatter(truth[:, 0], truth[:, 1], s=1, c="#bbbbbb", label="data")
        ax.scatter(x[:, 0], x[:, 1], s=1, c="#c0392b", label="one-step generator")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=7, markerscale=6)
    fig.suptitle("DMD on an 8-mode ring: which terms keep every mode (grey: data, red: generator)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
