"""The ``fewstep`` command: thin over the library (parse, call, report).

    fewstep bench solvers [--quick] [--json PATH] [--model NAME|PATH] [--w FLOAT]
                          [--nfe LIST] [--samples N] [--out-dir DIR] [--threads N]

Add a command with ``@main.command()`` or a group with ``@main.group()``. Misuse exits
with status 2 and one line on stderr (``fewstep: error: ...``), never a traceback: raise
``click.UsageError`` / ``click.BadParameter`` (or let a library raise the error type
that the command turns into one). Shared pieces: ``CommaList`` (every comma-separated
option), ``_guidance_w`` (every ``--w``), ``_check_writable`` (every output path, checked
before any work), ``_run_recipe`` (``train`` and ``distill``: every recipe of
``fewstep.recipes``), ``--steps`` (the budget of model calls of ``sample``, ``eval`` and ``tune``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__

__all__ = ["main"]


class OneLineErrors(click.Group):
    """A click group whose usage errors print one line, not click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name or "fewstep", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `fewstep` or `fewstep bench`: show help
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.ClickException as e:
            message = " ".join(e.format_message().split())  # one line whatever the message
            click.echo(f"fewstep: error: {message}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fewstep")
def main():
    """fewstep: fast sampling for diffusion models (training-free solvers and distillation)."""


# ---------------------------------------------------------------------------
# Shared parameter types and checks
# ---------------------------------------------------------------------------

class CommaList(click.ParamType):
    """A comma-separated list of numbers (``kind`` int or float), each finite and within [min, max]."""

    def __init__(self, kind: type = int, min: float | None = None, max: float | None = None, noun: str | None = None):
        self.kind, self.min, self.max = kind, min, max
        self.noun = noun or ("integers" if kind is int else "numbers")
        self.name = f"{self.noun} list"

    def convert(self, value, param, ctx):
        import math
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            values = [self.kind(v) for v in str(value).replace(",", " ").split()]
        except ValueError:
            self.fail(f"expected comma-separated {self.noun}, got {value!r}", param, ctx)
        if not values or not all(math.isfinite(v) for v in values):
            self.fail(f"expected one or more finite {self.noun}, got {value!r}", param, ctx)
        too_low = self.min is not None and min(values) < self.min
        if too_low or (self.max is not None and max(values) > self.max):
            bounds = (f"from {self.min} to {self.max}" if self.min is not None and self.max is not None
                      else f">= {self.min}" if self.min is not None else f"<= {self.max}")
            self.fail(f"expected {self.noun} {bounds}, got {value!r}", param, ctx)
        return values


def _guidance_w(ctx, param, value):
    """Every --w: finite and >= 0 (this project's convention x_w = (1 + w) x_cond - w x_uncond)."""
    import math
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}", ctx=ctx, param=param)
    if value is not None and value < 0:
        raise click.BadParameter(f"guidance weight w must be >= 0 (x_w = (1 + w) x_cond - w x_uncond: w = 0 is the "
                                 f"conditional model, w > 0 guides), got {value:g}", ctx=ctx, param=param)
    return value


def _check_writable(path, *, file: bool = False, force: bool = True):
    """Refuse, before any work starts, an output that cannot be written: a folder that cannot be created
    or written, or (``file=True``) a file that is a folder, exists without ``force``, or whose folder
    cannot be written. Returns the path."""
    import os
    path = Path(path)
    folder = path.parent if file else path
    if file and path.is_dir():
        raise click.UsageError(f"{path} is a folder; give a file name for --out")
    if file and path.exists() and not force:
        raise click.UsageError(f"{path} exists; pass --force to overwrite it or choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        target = f"cannot write {path}" if file else f"cannot write to {folder}"
        raise click.UsageError(f"{target} ({e.strerror or e}); choose another --out") from None
    return path


@main.group()
def bench():
    """Benchmarks: fewstep against its peers, written under benchmarks/results/."""


@bench.command("solvers")
@click.option("--quick", is_flag=True, help="Fewer solvers, NFE 5 and 10, 16 samples: under two minutes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Where to write the JSON (default: OUT_DIR/solvers.json, solvers_quick.json with --quick).")
@click.option("--model", default="mnist-teacher", show_default=True,
              help="mnist-teacher (the shipped teacher), gmm-mnist (an exact-denoiser Gaussian mixture), "
                   "flow-mixture (that mixture as a flow-matching model, SD3's shift 3, diffusers' flow schedulers), "
                   "or a path "
                   "to a diffusers model folder (UNet2DModel + scheduler "
                   "config) or to a fewstep model folder.")
@click.option("--w", type=float, default=None, callback=_guidance_w,
              help="Guidance weight w >= 0 (x_w = (1 + w) x_cond - w x_uncond); default 1.0.")
@click.option("--nfe", type=CommaList(int, min=1, max=1000), metavar="LIST",
              help="Comma-separated model-call budgets (default 4,5,6,8,10,15,20,50; 5,10 with --quick).")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Number of samples from fixed noise (default 64; 16 with --quick).")
@click.option("--out-dir", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True,
              help="Folder for the markdown table and the PNG plot.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads for the run (more threads oversubscribe a shared small machine).")
def bench_solvers(quick, json_path, model, w, nfe, samples, out_dir, threads):
    """Solver error against a reference ODE solution by NFE, fewstep vs diffusers, plus per-step overhead."""
    from .bench.solvers import BenchArgumentError, run
    log = lambda msg: click.echo(f"[bench solvers] {msg}", err=True)  # noqa: E731
    try:
        doc = run(quick=quick, json_path=json_path, model=model, w=w, nfe=nfe, samples=samples,
                  out_dir=out_dir, threads=threads, log=log)
    except BenchArgumentError as e:
        raise click.UsageError(str(e)) from None
    theirs = [r for r in doc["results"] if r["impl"] == "diffusers"]
    click.echo(f"{len(doc['results'])} rows ({len(theirs)} of them diffusers' schedulers) in "
               f"{doc['machine']['wall_time_s']} s; outputs in {out_dir}" + (f" and {json_path}" if json_path else ""))


@bench.command("speed")
@click.option("--out-dir", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True,
              help="Folder for speed.json and speed.md.")
@click.option("--batches", type=CommaList(int, min=1), default="1,256", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--w", type=float, default=1.0, show_default=True, callback=_guidance_w,
              help="Guidance weight (>= 0) of every row.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N (where a GPU is present).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
@click.option("--model", "models", multiple=True, metavar="NAME_OR_FOLDER",
              help="Time these models instead (repeatable): shipped names, fewstep folders or diffusers pipeline "
                   "folders (an exported student runs its own stock call); the first row is the baseline.")
def bench_speed(out_dir, batches, w, device, threads, models):
    """Images per second and seconds per image of every shipped model and sampler, batch 1 and 256, in one run."""

    import torch

    from .bench.speed import run_speed
    dev = _check_device(device)
    _check_writable(out_dir)
    if threads:
        torch.set_num_threads(threads)
    from .bench.speed import model_rows
    for m in models:
        _load_model(m)  # a missing or unreadable model: one line before any timing
    doc = run_speed(out_dir, batches=batches, w=w, device=str(dev), rows=model_rows(models, w) if models else None,
                    log=lambda m: click.echo(f"[bench speed] {m}", err=True))
    click.echo(f"{len(doc['rows'])} rows; wrote {Path(out_dir) / 'speed.md'} and {Path(out_dir) / 'speed.json'}")


# ---------------------------------------------------------------------------
# Models: sample, eval, train
# ---------------------------------------------------------------------------

def _solver_name(ctx, param, value):
    from .solvers import SOLVERS
    if value is not None and value not in SOLVERS:
        import difflib
        close = difflib.get_close_matches(value, SOLVERS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise click.BadParameter(f"unknown solver {value!r}{hint}; see `fewstep solvers`", ctx=ctx, param=param)
    return value


def _check_device(device: str):
    """A torch.device that exists on this machine, or a usage error that says what to use instead."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise click.UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
        raise click.UsageError(f"--device {device}: CUDA is not available here ({why}); use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise click.UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise click.UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    return dev


DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def _load_model(name):
    from .api import load
    try:
        return load(name)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None


def _grid_file(ctx, param, value):
    if value is None:
        return None
    from .grids import load_grid
    try:
        return load_grid(value)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise click.BadParameter(f"{value}: {e}; make one with `fewstep tune`", ctx=ctx, param=param) from None


def _grid_defaults(grid, solver, steps, spacing):
    """--grid sets the solver and the budget of model calls; a conflicting --steps or --spacing is refused."""
    if grid is None:
        return solver, steps, {}
    if spacing not in ("logsnr", "tuned"):
        raise click.UsageError(f"--grid gives the time grid; leave out --spacing {spacing}")
    if steps is not None and steps != grid.nfe:
        raise click.UsageError(f"the grid was tuned for {grid.nfe} model calls; leave out --steps or pass "
                               f"--steps {grid.nfe}")
    return (solver or grid.solver), grid.nfe, {"grid": grid}


def _steps_option(help: str, required: bool = False):
    """--steps, the one name of the budget of model calls (``sample``, ``eval``, ``tune``)."""
    return click.option("--steps", type=click.IntRange(min=1), default=None, required=required, help=help)


def _sampling_options(f):
    f = click.option("--seed", type=int, default=0, show_default=True, help="Image i depends on (seed, i) only.")(f)
    f = click.option("--grid", "grid", default=None, metavar="GRID.json", callback=_grid_file,
                     help="A tuned time grid (from `fewstep tune`); its solver and model calls are the defaults.")(f)
    f = click.option("--spacing", type=click.Choice(["logsnr", "time_uniform", "time_quadratic", "karras", "tuned"]),
                     default="logsnr", show_default=True,
                     help="Time grid; 'tuned': the model's shipped tuned grid for (solver, steps, w).")(f)
    f = click.option("--stochastic", is_flag=True,
                     help="Distilled students: the stochastic N-step sampler (Meng et al. 2022).")(f)
    f = _steps_option(help="Budget of model calls (see the README); default 20, or a distilled model's own.")(f)
    f = click.option("--solver", default=None, callback=_solver_name,
                     help="Solver (default dpmpp_2m); distilled models use their own sampler.")(f)
    f = click.option("--w", type=float, default=0.0, show_default=True, callback=_guidance_w,
                     help="Guidance weight w >= 0: x_w = (1 + w) x_cond - w x_uncond (w = 0: the conditional "
                          "model).")(f)
    return click.option("--model", default="mnist-teacher", show_default=True,
                        help="A shipped model name or a fewstep model folder.")(f)


@main.command("solvers")
def list_solvers():
    """List the solvers with their kind and order."""
    from .solvers import SOLVERS
    for name, s in SOLVERS.items():
        click.echo(f"{name:16s} {s.kind:10s} order {s.order}{'  stochastic' if s.stochastic else ''}  {s.summary}")


@main.command("sample")
@_sampling_options
@click.option("--labels", type=CommaList(int, noun="class ids"), metavar="LIST",
              help="Comma-separated class ids (default: 0..9 repeated).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Text-to-image pipelines (mnist-sd, mnist-sd3, a diffusers pipeline folder): the prompt; repeat "
                   "it for several (the images take them in turn). Default solver there: unipc_bh2_3.")
@click.option("-n", "--num", "n", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N (where a GPU is present).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="Network precision (autocast); schedule and solver math stay in float32/64.")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="PNG grid to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--singles", type=click.Path(file_okay=False), default=None, help="Also write single PNGs here.")
@click.option("--progress/--no-progress", default=True)
def sample_cmd(model, w, solver, steps, spacing, grid, seed, stochastic, labels, prompts, n, batch_size, device, dtype,
               out, force, singles, progress):
    """Generate images with a model and a solver (a text-to-image pipeline: with --prompt); write a PNG grid."""
    import contextlib
    import time

    import torch

    from .api import generate, is_pipeline
    from .images import save_image_grid, save_images
    dev = _check_device(device)
    m = _load_model(model)
    if prompts or is_pipeline(m):
        return _sample_prompts(m, model, list(prompts), labels=labels, w=w, solver=solver, steps=steps, spacing=spacing,
                               grid=grid, seed=seed, stochastic=stochastic, n=n, batch_size=batch_size, dev=dev,
                               dtype=dtype, out=out, force=force, singles=singles, progress=progress)
    if not hasattr(m, "sample_batch"):
        raise click.UsageError(f"{model!r} is not a generative model")
    _check_writable(out, file=True, force=force)  # before any sampling
    if singles:
        _check_writable(singles)
    m.to(dev)
    if labels is None and m.num_classes:
        labels = [i % m.num_classes for i in range(n)]
    try:
        t0 = time.perf_counter()
        solver, steps, extra = _grid_defaults(grid, solver, steps, spacing)
        extra.update({"stochastic": True} if stochastic else {})
        solver, steps = m.check_sampling(solver, steps, w)
        precision = (torch.autocast(dev.type, dtype=getattr(torch, DTYPES[dtype])) if DTYPES[dtype]
                     else contextlib.nullcontext())
        with precision:
            images = generate(m, None if labels is None else torch.tensor(labels), n=n, w=w, solver=solver,
                              steps=steps, spacing=spacing, seed=seed, batch_size=batch_size, progress=progress,
                              **extra)
        seconds = time.perf_counter() - t0
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    nrow = m.num_classes if labels is not None and len(images) % (m.num_classes or 1) == 0 else None
    path = save_image_grid(images, out, nrow=nrow)
    if singles:
        save_images(images, singles)
    nfe = grid.nfe if grid is not None else m.nfe(solver, steps, spacing)
    cfg_call = m.evaluations_per_call(w) == 2
    click.echo(f"wrote {path} ({len(images)} images); NFE {nfe if nfe is not None else 'adaptive'}"
               f"{' (each a batched cond+uncond call)' if cfg_call else ''}; {seconds / len(images):.4f} s/image")


def _check_prompt_options(m, model: str, prompts, labels, grid, stochastic) -> None:
    """--prompt goes with a text-to-image pipeline, --labels / --grid / --stochastic with a fewstep model."""
    from .api import is_pipeline
    if not is_pipeline(m):
        raise click.UsageError(f"--prompt is for text-to-image pipelines (mnist-sd, mnist-sd3, a diffusers pipeline "
                               f"folder); {model!r} is a fewstep model: pass --labels (class ids) instead")
    if not prompts:
        raise click.UsageError(f"{model!r} is a text-to-image pipeline: give --prompt TEXT (repeatable), e.g. "
                               "--prompt \"a handwritten seven\"")
    for given, option in ((labels, "--labels"), (stochastic, "--stochastic")):
        if given:
            raise click.UsageError(f"{option} is for fewstep models; a text-to-image pipeline takes --prompt, "
                                   "--solver, --steps, --spacing, --grid and --w")


def _sample_prompts(m, model: str, prompts: list[str], *, labels, w, solver, steps, spacing, grid, seed, stochastic, n,
                    batch_size, dev, dtype, out, force, singles, progress):
    """``sample --prompt``: a text-to-image pipeline through fewstep.generate(prompts=); writes the PNG grid
    (one column per prompt when the images fill whole rows)."""
    import contextlib
    import time

    import torch

    from .api import generate, pipeline_calls
    from .images import save_image_grid, save_images
    _check_prompt_options(m, model, prompts, labels, grid, stochastic)
    _check_writable(out, file=True, force=force)  # before any sampling
    if singles:
        _check_writable(singles)
    m.to(dev)
    try:
        t0 = time.perf_counter()
        precision = (torch.autocast(dev.type, dtype=getattr(torch, DTYPES[dtype])) if DTYPES[dtype]
                     else contextlib.nullcontext())
        extra = {} if grid is None else {"grid": grid}
        with precision:
            images = generate(m, prompts=prompts, n=n, w=w, solver=solver, steps=steps, spacing=spacing, seed=seed,
                              batch_size=batch_size, progress=progress, **extra)
        seconds = time.perf_counter() - t0
        if grid is not None or spacing == "tuned":  # a tuned solver: one model call per step (generate checked them)
            calls = grid.nfe if grid is not None else steps
        else:
            calls = pipeline_calls(m, solver, steps, spacing)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    nrow = len(prompts) if len(prompts) > 1 and len(images) % len(prompts) == 0 else None
    path = save_image_grid(images, out, nrow=nrow)
    if singles:
        save_images(images, singles)
    click.echo(f"wrote {path} ({len(images)} images, {len(prompts)} prompt(s)); NFE "
               f"{calls if calls is not None else 'adaptive'}{' (each a batched cond+uncond call)' if w else ''}; "
               f"{seconds / len(images):.4f} s/image")


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="fewstep-demo", show_default=True,
              help="Folder for comparison.png, table.md and table.json.")
@click.option("--force", is_flag=True, help="Write into --out even if it already holds a demo.")
@click.option("--w", type=float, default=1.0, show_default=True, callback=_guidance_w,
              help="Guidance weight (>= 0) of every row.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fid-n", type=click.IntRange(min=0, max=2000), default=200, show_default=True,
              help="Samples per FID/KID (0: none).")
@click.option("--budget", type=click.FloatRange(min=0), default=100.0, show_default=True,
              help="Seconds for FID/KID; rows that do not fit are reported without them.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
def demo_cmd(out, force, w, seed, fid_n, budget, threads):
    """The shipped teacher, its fast solvers and its distilled students side by side on the same
    classes and seeds: a comparison image and a table of network evaluations, seconds per image,
    speed-up over the teacher's 50-step DDIM, and FID/KID."""

    import torch

    from .demo import run_demo
    folder = Path(out)
    if (folder / "table.json").exists() and not force:
        raise click.UsageError(f"{folder} already holds a demo; pass --force to overwrite it or choose another --out")
    _check_writable(folder)
    if threads:
        torch.set_num_threads(threads)
    doc = run_demo(folder, w=w, seed=seed, fid_n=fid_n, budget_seconds=budget)
    click.echo(f"wrote {doc['files']['image']}, {doc['files']['markdown']} and {doc['files']['json']}")


@main.command("app")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=None,
              help="Port on 127.0.0.1 (default: the first free one from 7860).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
def app_cmd(port, threads):
    """A local web page (Gradio, on 127.0.0.1 only): pick a shipped model, sampler, steps, w and classes and
    see its images beside the teacher's 50-step DDIM images for the same seeds, with network evaluations
    and seconds per image. Needs the extra: pip install "fewstep[app]"."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        click.echo('fewstep app needs gradio: pip install "fewstep[app]"', err=True)
        sys.exit(2)
    import torch

    from .app import launch
    if threads:
        torch.set_num_threads(threads)
    try:
        launch(port=port)
    except OSError as e:  # the port is taken
        raise click.UsageError(f"cannot serve on 127.0.0.1{f':{port}' if port else ''} ({e}); choose another --port")


def _eval_options(f):
    """eval's --steps takes a comma list (each value evaluated) where sample and tune take one budget; its
    --model also names diffusers text pipelines."""
    for p in f.__click_params__:
        if p.name == "steps":
            p.type, p.metavar = CommaList(int, min=1), "K[,K...]"
            p.help = ("Budget(s) of model calls, comma-separated (a list is a sweep; default 20 or a distilled model's "
                      "own); text pipelines: num_inference_steps (default 25).")
        if p.name == "model":
            p.help = ("A shipped model name, a fewstep model folder, or a diffusers text-to-image pipeline: mnist-sd, "
                      "mnist-sd3 or a folder with model_index.json (then the 90-prompt suite is evaluated).")
    return f


def _scheduler_names(ctx, param, value):
    """--scheduler: comma-separated names that fewstep.evaluate.make_scheduler knows."""
    if value is None:
        return None
    from .evaluate import check_scheduler_name
    try:
        return [check_scheduler_name(v) for v in value.replace(",", " ").split()] or None
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


@main.command("eval")
@_eval_options
@_sampling_options
@click.option("-n", "--num", "n", type=click.IntRange(min=20), default=2000, show_default=True,
              help="Samples (class-balanced); at most 2000 for fewstep models (two disjoint real sets of n are "
                   "needed); text pipelines: rounded up to a multiple of the 90 prompts (2000 -> 2070).")
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True,
              help="Images per batch (text pipelines: default 90, one of each prompt; the seed is per batch).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the JSON here.")
@click.option("--sweep-steps", type=CommaList(int, min=1), default=None, metavar="LIST",
              help="Comma-separated step budgets: evaluate each (with every --sweep-w); writes JSON, a markdown "
                   "table (.md) and a plot of FID against NFE (.png) beside --json.")
@click.option("--sweep-w", type=CommaList(float, min=0), default=None, metavar="LIST",
              help="Comma-separated guidance weights (>= 0) for the sweep.")
@click.option("--scheduler", "schedulers", default=None, metavar="LIST", callback=_scheduler_names,
              help="Text pipelines: comma-separated schedulers: stock (the pipeline's own), dpmsolver, unipc, "
                   "fewstep (FewstepScheduler's default solver), fewstep:<solver>; default stock.")
@click.option("--guidance-scale", "guidance_scales", type=CommaList(float, min=1), default=None, metavar="LIST",
              help="Text pipelines: comma-separated guidance_scale values (diffusers' 1 + w); default 3.")
@click.pass_context
def eval_cmd(ctx, model, w, solver, steps, spacing, grid, seed, stochastic, n, batch_size, json_path, sweep_steps,
             sweep_w, schedulers, guidance_scales):
    """FID, KID, IS, class accuracy, NFE and seconds per image, beside the real-vs-real baseline;
    with --sweep-steps / --sweep-w, for every (steps, w) with a table and a plot. A diffusers text
    pipeline (mnist-sd, mnist-sd3, a pipeline folder): the 90-prompt suite for every (guidance scale,
    scheduler, steps), with prompted-digit accuracy and thickness / slant adherence."""

    from .evaluate import evaluate, evaluate_grid, grid_markdown, plot_grid, text_pipeline_folder
    if steps and sweep_steps:
        raise click.UsageError("give the step budgets once: --steps 4,8,16 (or --sweep-steps 4,8,16)")
    try:
        is_pipeline = text_pipeline_folder(model) is not None
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from None
    if is_pipeline:
        return _eval_prompts(ctx, model, steps=steps or sweep_steps, seed=seed, n=n, json_path=json_path,
                             schedulers=schedulers, guidance_scales=guidance_scales)
    if schedulers or guidance_scales:
        raise click.UsageError(f"--scheduler and --guidance-scale are for diffusers text pipelines (mnist-sd, "
                               f"mnist-sd3 or a pipeline folder), not {model}; for a fewstep model use --solver and --w")
    sweep_steps, steps = (steps, None) if steps and len(steps) > 1 else (sweep_steps, steps[0] if steps else None)
    if json_path:
        _check_writable(json_path, file=True)  # eval results are meant to be refreshed
    m = _load_model(model)
    solver, steps, extra = _grid_defaults(grid, solver, steps, spacing)
    extra.update({"stochastic": True} if stochastic else {})
    if sweep_steps or sweep_w:
        if grid is not None and sweep_steps:
            raise click.UsageError("a tuned --grid has one budget of model calls; sweep steps with --spacing tuned")
        if not json_path:
            raise click.UsageError("a sweep writes JSON, markdown and a plot: give --json PATH")
        try:
            doc = evaluate_grid(m, steps_list=sweep_steps or [steps], w_list=sweep_w or [w], solver=solver, n=n, seed=seed,
                                batch_size=batch_size, spacing=spacing, log=lambda msg: click.echo(msg, err=True), **extra)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        path = Path(json_path)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        path.with_suffix(".md").write_text(grid_markdown(doc))
        plot_grid(doc, path.with_suffix(".png"))
        click.echo(grid_markdown(doc))
        click.echo(f"wrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")
        return
    try:
        res = evaluate(m, solver=solver, steps=steps, w=w, n=n, seed=seed, batch_size=batch_size, spacing=spacing,
                       progress=True, **extra)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    text = json.dumps(res, indent=2)
    if json_path:
        Path(json_path).write_text(text + "\n")
    click.echo(text)


def _eval_prompts(ctx, model, *, steps, seed, n, json_path, schedulers, guidance_scales):
    """eval of a diffusers text pipeline: fewstep.evaluate.evaluate_prompts_grid; with --json, also .md and .png."""

    from click.core import ParameterSource

    from .evaluate import (DEFAULT_GUIDANCE_SCALE, evaluate_prompts_grid, load_text_pipeline, plot_prompts,
                           prompts_markdown, suite_size)
    given = lambda name: ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE  # noqa: E731
    fewstep_only = [f"--{k.replace('_', '-')}" for k in ("solver", "w", "spacing", "grid", "stochastic", "sweep_w")
                    if given(k)]
    if fewstep_only:
        raise click.UsageError(f"{', '.join(fewstep_only)}: for fewstep models; a text pipeline takes --scheduler, "
                               "--steps and --guidance-scale (= 1 + w)")
    try:
        suite_size(n)
    except ValueError as e:
        raise click.UsageError(f"-n {n}: {e}") from None
    if json_path:
        _check_writable(json_path, file=True)
    try:
        pipe = load_text_pipeline(model)
        doc = evaluate_prompts_grid(pipe, schedulers=schedulers or ["stock"], steps_list=steps or [25],
                                    guidance_scales=guidance_scales or [DEFAULT_GUIDANCE_SCALE], n=n, seed=seed,
                                    batch_size=ctx.params["batch_size"] if given("batch_size") else 90,
                                    log=lambda msg: click.echo(msg, err=True))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    doc["model"] = str(model)
    click.echo(prompts_markdown(doc))
    if json_path:
        path = Path(json_path)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        path.with_suffix(".md").write_text(prompts_markdown(doc))
        plot_prompts(doc, path.with_suffix(".png"))
        click.echo(f"wrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")


def _recipe_options(out_help: str):
    """The options of every command that runs a recipe (``train``, ``distill ...``)."""
    def add(f):
        f = click.option("--progress/--no-progress", default=True)(f)
        f = click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                         help="torch CPU threads")(f)
        f = click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoints.")(f)
        return click.option("--out", type=click.Path(file_okay=False), required=True, help=out_help)(f)
    return add


def _run_recipe(recipe: str, out, threads: int, settings=None, **options):
    """Run recipe ``recipe`` of ``fewstep.recipes.RECIPES`` (with ``settings`` instead of its preset, if given)
    into run folder ``out`` (checked first) with ``threads`` torch threads; its refusals (ValueError, an
    existing run) become one-line usage errors."""
    import torch

    from .recipes import RECIPES
    out = _check_writable(out)
    torch.set_num_threads(threads)
    try:
        return RECIPES[recipe](out, settings, **options)
    except (ValueError, FileExistsError) as e:
        raise click.UsageError(str(e)) from None


@main.command("train")
@click.argument("preset", type=click.Choice(["mnist", "mnist-teacher", "mnist-classifier", "mnist-vae", "mnist-sd",
                                                "mnist-sd3"]))
@_recipe_options("Run folder: checkpoints, log.jsonl, samples/, and the export model/.")
@click.option("--vae", default=None, help="mnist-sd / mnist-sd3: reuse this AutoencoderKL (a folder, or the shipped "
                                          "name mnist-vae) instead of training one first.")
@click.option("--data", type=click.Path(), default=None, metavar="DIR",
              help="mnist-vae / mnist-sd / mnist-sd3: train on your own images (any size; made grayscale 32x32) "
                   "instead of MNIST.")
@click.option("--captions", type=click.Path(), default=None, metavar="FILE",
              help="With --data: the captions, a metadata.jsonl (lines {\"file_name\": ..., \"text\": ...}, names "
                   "relative to DIR) or a CSV with columns file_name,text (default: DIR/metadata.jsonl).")
def train_cmd(preset, out, resume, threads, progress, vae, data, captions):
    """Train a model from a preset: mnist (= mnist-teacher) or mnist-classifier reproduce the shipped ones;
    mnist-vae / mnist-sd / mnist-sd3 also train on your own captioned images (--data)."""
    options = {}
    if vae is not None:
        if preset not in ("mnist-sd", "mnist-sd3"):
            raise click.UsageError(f"--vae is for mnist-sd and mnist-sd3 (they train on its latents), not {preset}")
        folder = _vae_folder(vae)
        options["vae"] = lambda: folder
    if data is not None or captions is not None:
        options["data"] = _own_data(preset, data, captions)
    _run_recipe("mnist-teacher" if preset == "mnist" else preset, out, threads, resume=resume, progress=progress,
                **options)


def _own_data(preset: str, data, captions):
    """train --data DIR [--captions FILE]: the recipe's data provider, the folder read (and refused in one line)
    before any training starts."""
    from .recipes.textbed import folder_data
    if preset not in ("mnist-vae", "mnist-sd", "mnist-sd3"):
        raise click.UsageError(f"--data is for mnist-vae, mnist-sd and mnist-sd3 (the text-to-image test bed), not "
                               f"{preset}")
    if data is None:
        raise click.UsageError("--captions goes with --data DIR (the image folder the captions describe)")
    provider = folder_data(data, captions, need_captions=preset != "mnist-vae")
    try:
        images, texts = provider()
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"--data {data}: {len(images)} images" + (f", {len(set(texts))} distinct captions" if texts else ""),
               err=True)
    return provider


def _vae_folder(name_or_path: str) -> Path:
    """A diffusers AutoencoderKL folder from a shipped name or a path (a test-bed run folder's mnist-vae too)."""
    from .api import ASSETS
    for folder in (ASSETS / name_or_path, Path(name_or_path), Path(name_or_path) / "mnist-vae"):
        if (folder / "config.json").is_file() and \
                json.loads((folder / "config.json").read_text()).get("_class_name") == "AutoencoderKL":
            return folder
    raise click.BadParameter(f"{name_or_path!r} is neither a shipped VAE (mnist-vae) nor a folder holding a diffusers "
                             "AutoencoderKL (config.json with _class_name AutoencoderKL)", param_hint="--vae")


def _learning_rates(ctx, param, value):
    """--learning-rate G[,F] -> (G, F or None), both positive."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or any(not v > 0 for v in parts):
        raise click.BadParameter(f"{value!r}: give one positive learning rate (the generator's, e.g. 2e-4) or two "
                                 "separated by a comma (generator, fake score: 2e-4,4e-4)")
    return parts[0], (parts[1] if len(parts) == 2 else None)


def _teacher_options(f):
    """--teacher, --prompts, --mixed-precision and --gradient-checkpointing of every distill command."""
    f = click.option("--max-memory", "max_memory_gib", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="GIB", help="Refuse up front a run whose weights, gradients, AdamW moments and EMA "
                                         "would need more than GIB GiB (printed before training).")(f)
    f = click.option("--lora-targets", "lora_targets", type=click.Choice(["attention", "attention+ff", "all"]),
                     default=None, help="Layers that get LoRA adapters (with --lora-rank; default: the preset's, "
                                        "attention): attention, attention+ff, or all (also the UNet's convolutions).")(f)
    f = click.option("--lora-rank", "lora_rank", type=click.IntRange(min=1), default=None, metavar="R",
                     help="Train rank-R LoRA adapters (peft) over the teacher's frozen weights (pipeline teachers); "
                          "the export is a pytorch_lora_weights.safetensors for load_lora_weights, its scheduler/ "
                          "and a README.md model card.")(f)
    f = click.option("--gradient-checkpointing", is_flag=True, default=False,
                     help="Recompute activations in the backward pass (diffusers teachers): less memory, slower steps.")(f)
    f = click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None,
                     help="Autocast precision of training (default: the preset's, no). fp16 needs a CUDA GPU.")(f)
    f = click.option("--sharding", type=click.Choice(["fsdp", "none"]), default=None,
                     help="fsdp: shard the trained networks over the processes (FSDP2; docs/fsdp.md); default: as "
                          "accelerate launch --use_fsdp says, else none.")(f)
    f = click.option("--null-class", "null_class", type=click.IntRange(min=0), default=None, metavar="K",
                     help="Class-conditional UNet teachers: the class id it was trained with as unconditional "
                          "(needed for guidance).")(f)
    f = click.option("--captions", type=click.Path(), default=None, metavar="FILE",
                     help="With --data: the captions, a metadata.jsonl (lines {\"file_name\": ..., \"text\": ...}) "
                          "or a CSV with columns file_name,text (default: DIR/metadata.jsonl).")(f)
    f = click.option("--data", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="Guided / progressive, pipeline teachers: train on your own captioned images (at the "
                          "teacher's pixel size; the captions are the prompts) instead of the teacher's own samples; "
                          "encoded once by its VAE and cached in --out. DMD with --preset mnist-dmd2-4: the real "
                          "images of DMD2's GAN term (required there for pipeline teachers).")(f)
    f = click.option("--prompts", type=click.Path(dir_okay=False), default=None,
                     help="Text-to-image teachers: a file of prompts, one per line, to distill over (default for the "
                          "shipped mnist-sd / mnist-sd3: the test bed's 90-prompt suite).")(f)
    return click.option("--teacher", default=None,
                        help="The teacher: a shipped name (mnist-teacher, mnist-sd, mnist-sd3), a fewstep model folder "
                             "or a diffusers pipeline folder (model_index.json). Default: the preset's.")(f)


def _preset_settings(preset: str):
    from .recipes import RECIPES
    return RECIPES[preset].settings


def _distill_settings(preset: str, teacher, suffix: str, max_train_steps=None, **changes):
    """(settings or None for the preset's own, export name) of a distill command: the preset with the options
    that were given (None = not given; ``max_train_steps`` caps every stage's and round's training steps); a
    --teacher other than the preset's names its students ``<teacher>-<suffix>``."""
    from dataclasses import replace

    from .recipes import RECIPES, teacher_recipe_name
    from .recipes._stage import capped_steps
    from .train import check_mixed_precision
    base = RECIPES[preset].settings
    given = {k: v for k, v in {**changes, "teacher": teacher}.items() if v is not None and v is not False}
    if max_train_steps is not None:
        given.update(capped_steps(base, max_train_steps))
    try:
        check_mixed_precision(given.get("mixed_precision", "no"))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    name = preset if teacher in (None, base.teacher) else teacher_recipe_name(teacher, suffix)
    if changes.get("lora_rank"):
        name = f"{name}-lora{changes['lora_rank']}"  # beside the full student, never over it
    try:
        return (replace(base, **given) if given else None), name
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _teacher_provider(teacher, prompts, data=None, captions=None, out=None, null_class=None, guidance=False) -> dict:
    """The recipe's ``teacher=`` (and with --data, ``data=``) providers for --teacher / --prompts / --data /
    --captions, checked now: one-line errors before any work. --data's captions are the prompts; its images,
    which must have the teacher's pixel size, are encoded once by its VAE (cached in --out)."""
    if teacher is None and prompts is None and data is None and captions is None:
        if null_class is not None:
            raise click.UsageError("--null-class needs a diffusers --teacher (a class-conditional UNet pipeline)")
        return {}
    from .recipes.teachers import PipelineTeacher, read_prompts, teacher_from
    try:
        if captions is not None and data is None:
            raise ValueError("--captions goes with --data DIR (the images it captions)")
        if teacher is None:
            raise ValueError(f"{'--prompts' if data is None else '--data'} needs a text-to-image --teacher (e.g. "
                             "--teacher mnist-sd or a pipeline folder)")
        if data is not None and prompts is not None:
            raise ValueError("--data's captions are the prompts to distill over: leave --prompts out")
        if data is None:
            made = teacher_from(teacher, read_prompts(prompts) if prompts is not None else None,
                                null_class=null_class, guidance=guidance)
            return {"teacher": lambda: made}
        from .recipes.latents import caption_prompts, check_image_sizes, encoded_data, pixel_geometry
        paths, texts, labels = caption_prompts(data, captions)
        made = teacher_from(teacher, texts, null_class=null_class, guidance=guidance)
        if not isinstance(made, PipelineTeacher):
            raise ValueError(f"--data is for diffusers pipeline teachers; {teacher} trains on MNIST: leave it out")
        check_image_sizes(paths, pixel_geometry(made.pipe)[1], data)
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    return {"teacher": lambda: made, "data": lambda: encoded_data(made, paths, labels, out)}


@main.group()
def distill():
    """Distill a teacher into a few-step student (guided + progressive, DMD)."""


_distill_options = _recipe_options("Run folder: one sub-folder per stage (checkpoints, log.jsonl, samples/) and the "
                                   "exported students.")


def _w_range(text):
    """--w-range LO,HI -> (lo, hi), or None when not given; a malformed value is a one-line usage error."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two numbers LO,HI such as 0,4, got {text!r}", param_hint="--w-range")
    if not 0 <= lo <= hi:
        raise click.BadParameter(f"need 0 <= LO <= HI, got {text!r}", param_hint="--w-range")
    return (lo, hi)


@distill.command("guided")
@_distill_options
@click.option("--until", type=click.IntRange(min=1), default=None,
              help="Stop after the round that reaches this many steps (default: down to 1; 32: stage 1 only).")
@click.option("--part", type=click.Choice(["all", "decoder", "encoder"]), default="all", show_default=True,
              help="decoder: stage 1 and the sampling rounds; encoder: stage 1 and the distilled encoder's rounds "
                   "(the two can run at once in two processes on the same --out).")
@_teacher_options
@click.option("--max-train-steps", "max_train_steps", type=click.IntRange(min=1), default=None, metavar="K",
              help="Cap every stage's and every round's training steps at K (default: the preset's; for quick "
                   "trials and smoke runs).")
@click.option("--w-range", type=str, default=None, metavar="LO,HI",
              help="Guidance weights the w-conditioned student learns, drawn uniformly (default: the preset's, 0,4; "
                   "diffusers' guidance_scale = 1 + w).")
def distill_guided_cmd(out, resume, threads, progress, until, part, teacher, prompts, data, captions, null_class, sharding,
                       mixed_precision, gradient_checkpointing, lora_rank, lora_targets, max_memory_gib, max_train_steps,
                       w_range):
    """Guided distillation: stage 1 (w-conditioned student), then progressive rounds 32 -> 16 -> 8 -> 4 -> 2 -> 1
    steps. Of the shipped mnist-teacher by default (reproduces mnist-guided-stage1 / -8 / -4 / -2 / -1); of a
    diffusers pipeline with --teacher (mnist-sd: reproduces mnist-sd-guided-4 with --until 4), exported to
    DIR/export/<name>-<N> as pipelines stock diffusers runs (guidance_scale = 1 + w)."""
    preset = "mnist-sd-guided" if teacher == "mnist-sd" else "mnist-guided"
    settings, name = _distill_settings(preset, teacher, "guided", max_train_steps, w_range=_w_range(w_range),
                                       mixed_precision=mixed_precision,
                                       gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                                       lora_targets=lora_targets, sharding=sharding,
                                       max_memory_gib=max_memory_gib)
    exports = _run_recipe(preset, out, threads, settings, resume=resume, progress=progress, until=until, part=part,
                          name=name, **_teacher_provider(teacher, prompts, data, captions, out, null_class, True))
    for name, folder in exports.items():
        click.echo(f"{name}: {folder}")


@distill.command("progressive")
@_distill_options
@click.option("--until", type=click.IntRange(min=1), default=None,
              help="Stop after the round that reaches this many steps (default: down to 4).")
@_teacher_options
@click.option("--max-train-steps", "max_train_steps", type=click.IntRange(min=1), default=None, metavar="K",
              help="Cap every stage's and every round's training steps at K (default: the preset's; for quick "
                   "trials and smoke runs).")
def distill_progressive_cmd(out, resume, threads, progress, until, teacher, prompts, data, captions, null_class, sharding,
                            mixed_precision, gradient_checkpointing, lora_rank, lora_targets, max_memory_gib,
                            max_train_steps):
    """Plain progressive distillation (Salimans & Ho 2022) of the teacher's conditional model (default: the
    shipped mnist-teacher; any fewstep model or diffusers pipeline folder with --teacher): rounds 32 -> 16 -> 8
    -> 4 steps, exported as <name>-<N> students (a pipeline teacher's: DIR/export/<name>-<N> pipelines)."""
    settings, name = _distill_settings("mnist-progressive", teacher, "progressive", max_train_steps,
                                       mixed_precision=mixed_precision,
                                       gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                                       lora_targets=lora_targets, sharding=sharding,
                                       max_memory_gib=max_memory_gib)
    exports = _run_recipe("mnist-progressive", out, threads, settings, resume=resume, progress=progress, until=until,
                          name=name, **_teacher_provider(teacher, prompts, data, captions, out, null_class))
    for name, folder in exports.items():
        click.echo(f"{name}: {folder}")


@distill.command("dmd")
@_distill_options
@click.option("--preset", type=click.Choice(["mnist-dmd-1", "mnist-dmd2-4", "mnist-sd-dmd-1", "mnist-sd-dmd-1-lora",
                                            "mnist-sd-dmd-1-cooldown", "mnist-sd-dmd-1-ttur",
                                            "mnist-sd-dmd-1-anneal", "mnist-sd3-dmd-1"]),
              default=None, help="mnist-dmd-1 (the default): one-step DMD with regression; mnist-dmd2-4: DMD2 (no "
                                 "regression, 5 fake updates per generator update, GAN head, 4 steps); mnist-sd-dmd-1 / "
                                 "mnist-sd3-dmd-1: one-step DMD of the text-to-image test bed's pipelines; "
                                 "mnist-sd-dmd-1-lora: mnist-sd-dmd-1 as a rank-16 LoRA; mnist-sd-dmd-1-cooldown: "
                                 "mnist-sd-dmd-1 trained on at half the learning rate; mnist-sd-dmd-1-ttur: the "
                                 "cooldown trained on with 3 fake-score updates per generator update; "
                                 "mnist-sd-dmd-1-anneal: that run continued at 0.3x the generator's learning "
                                 "rate.")
@_teacher_options
@click.option("--w", type=float, default=None, callback=_guidance_w,
              help="Guidance weight of the teacher's score, baked into the generator (default: the preset's).")
@click.option("--train-steps", "--max-train-steps", "steps", type=click.IntRange(min=1), default=None,
              help="Training steps (default: the preset's).")
@click.option("--steps", "old_steps", type=click.IntRange(min=1), default=None, hidden=True,
              help="Deprecated name of --train-steps (--steps is the budget of model calls elsewhere).")
@click.option("--learning-rate", "learning_rate", default=None, metavar="G[,F]", callback=_learning_rates,
              help="AdamW learning rate of the generator, and of the fake score after a comma (default: the "
                   "preset's; G alone keeps the preset's fake / generator ratio).")
@click.option("--init", default=None, metavar="GENERATOR",
              help="Start the generator from a trained one of the same teacher (a shipped name such as "
                   "mnist-sd-dmd-1, or DIR/export/<name> of an earlier run) instead of the teacher's weights "
                   "(default: the preset's).")
@click.option("--fake-warmup", type=click.IntRange(min=0), default=None, metavar="K",
              help="First K steps train the fake score alone, so that it learns the generator's samples before "
                   "the generator moves (default: the preset's; with --init and a preset without one, 400).")
@click.option("--batch-size", "batch_size", type=click.IntRange(min=1), default=None, metavar="B",
              help="Samples per generator and fake-score update (default: the preset's).")
@click.option("--fake-updates", "fake_updates", type=click.IntRange(min=1), default=None, metavar="N",
              help="Fake-score updates per generator update (DMD2's two time-scale rule; default: the preset's, "
                   "1; mnist-dmd2-4: 5). --train-steps counts fake-score updates.")
@click.option("--gen-prediction", type=click.Choice(["eps", "v", "x0"]), default=None,
              help="The generator's output type (default: the preset's; else the teacher's). x0 for eps teachers "
                   "such as Stable Diffusion: at t = 999 an eps output's errors reach the image x1/alpha (x14.7).")
def distill_dmd_cmd(out, resume, threads, progress, preset, teacher, prompts, data, captions, null_class, sharding,
                    mixed_precision, gradient_checkpointing, lora_rank, lora_targets, max_memory_gib, w, steps, old_steps,
                    learning_rate, init, fake_warmup, batch_size, fake_updates, gen_prediction):
    """Distribution Matching Distillation into a one-step (or DMD2 four-step) generator: of the shipped
    mnist-teacher (reproduces mnist-dmd-1 / mnist-dmd2-4), of the test bed's pipelines (mnist-sd-dmd-1,
    mnist-sd3-dmd-1), or of any --teacher (a fewstep model or a diffusers pipeline folder)."""
    if old_steps is not None:
        click.echo("fewstep: warning: distill dmd --steps is deprecated; use --train-steps", err=True)
        steps = old_steps if steps is None else steps
    preset = preset or {"mnist-sd": "mnist-sd-dmd-1", "mnist-sd3": "mnist-sd3-dmd-1"}.get(teacher, "mnist-dmd-1")
    base = _preset_settings(preset)
    suffix = f"dmd{'2' if base.gan_weight_d > 0 else ''}-{base.gen_steps}"
    if learning_rate is not None:  # G alone keeps the preset's fake / generator ratio
        gen, fake = learning_rate
        ratio = base.lr["fake"] / base.lr["generator"]
        learning_rate = {"generator": gen, "fake": fake if fake is not None else float(f"{gen * ratio:.12g}")}
    if init is not None and fake_warmup is None and base.fake_warmup == 0:
        from .recipes.dmd import INIT_FAKE_WARMUP
        fake_warmup = INIT_FAKE_WARMUP  # a fake score that starts as the teacher drags a trained generator off
    settings, name = _distill_settings(preset, teacher, suffix, steps=steps, real_w=w, gen_prediction=gen_prediction,
                                       lr=learning_rate, init=init, fake_warmup=fake_warmup,
                                       batch_size=batch_size, fake_updates=fake_updates,
                                       mixed_precision=mixed_precision,
                                       gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                                       lora_targets=lora_targets, sharding=sharding,
                                       max_memory_gib=max_memory_gib)
    chosen = settings or base
    real_w = chosen.real_w
    if (data is not None or captions is not None) and chosen.gan_weight_d == 0:
        raise click.UsageError("distill dmd trains from noise and the teacher's scores (its regression pairs are the "
                               "teacher's own samples); --data feeds only DMD2's GAN term (--preset mnist-dmd2-4): "
                               "leave --data / --captions out or add that preset")
    folder = _run_recipe(preset, out, threads, settings, resume=resume, progress=progress, name=name,
                         **_teacher_provider(teacher, prompts, data, captions, out, null_class, real_w > 0))
    click.echo(f"{name}: {folder}")


@main.command("translate")
@click.option("--from", "source", type=click.IntRange(0, 9), required=True, help="Class of the input digits.")
@click.option("--to", "target", type=click.IntRange(0, 9), required=True, help="Class to translate them to.")
@click.option("--encoder", default="mnist-guided-encoder-4", show_default=True,
              help="A distilled encoder (name or folder).")
@click.option("--decoder", default="mnist-guided-4", show_default=True, help="A distilled student (name or folder).")
@click.option("--w", type=float, default=1.0, show_default=True, callback=_guidance_w,
              help="Guidance weight (>= 0).")
@click.option("-n", "--num", "n", type=click.IntRange(min=1, max=100), default=10, show_default=True,
              help="Held-out digits of class --from to translate.")
@click.option("--out", type=click.Path(dir_okay=False), default="translate.png", show_default=True,
              help="PNG: inputs (top row) and translations (bottom row).")
def translate_cmd(source, target, encoder, decoder, w, n, out):
    """Class-to-class translation of MNIST digits: encode under --from, decode under --to."""
    import torch

    from .api import EncoderModel, StudentModel, load
    from .data.mnist import load_mnist
    from .distill.samplers import translate
    from .images import save_image_grid
    _check_writable(out, file=True)
    enc, dec = _load_model(encoder), _load_model(decoder)
    if not isinstance(enc, EncoderModel):
        raise click.UsageError(f"{encoder!r} is not a distilled encoder")
    if not isinstance(dec, StudentModel) or isinstance(dec, EncoderModel):
        raise click.UsageError(f"{decoder!r} is not a distilled (decoder) student")
    x, y = load_mnist("heldout")
    x0 = x[y == source][:n]
    out_x = translate(enc.denoiser(w), dec.denoiser(w), x0, dec.schedule,
                      source_labels=torch.full((len(x0),), source), target_labels=torch.full((len(x0),), target),
                      encoder_steps=enc.student_steps, decoder_steps=dec.student_steps).clamp(-1, 1)
    acc = (load("mnist-classifier")(out_x).argmax(1) == target).float().mean().item()
    path = save_image_grid(torch.cat([x0, out_x]), out, nrow=len(x0))
    click.echo(f"wrote {path}: {len(x0)} digits {source} -> {target}; classified as {target}: {100 * acc:.0f}%; "
               f"network calls per image: {enc.student_steps} + {dec.student_steps}")


def _budget_alias(steps, nfe):
    """tune's deprecated --nfe: the same budget as --steps (warns; a conflicting pair is refused)."""
    if nfe is not None:
        click.echo("fewstep: warning: --nfe is deprecated; use --steps (the same budget of model calls)", err=True)
        if steps is not None and steps != nfe:
            raise click.UsageError(f"--nfe {nfe} and --steps {steps} disagree; give --steps only")
    if steps is None and nfe is None:
        raise click.UsageError("missing option --steps (the budget of model calls to tune the grid for)")
    return steps if steps is not None else nfe


def _tune_target(model, prompts, null_class, w):
    """What `fewstep tune` fits: a fewstep diffusion model, or a diffusers pipeline as a teacher over its prompts."""
    from .api import diffusers_class, _resolve
    try:
        folder = _resolve(model)
    except (FileNotFoundError, ValueError):
        folder = None
    if folder is None or diffusers_class(folder) is None:
        if prompts is not None or null_class is not None:
            raise click.UsageError(f"--{'prompts' if prompts is not None else 'null-class'} is for diffusers pipeline "
                                   f"folders; {model} is a fewstep model: leave it out")
        return _load_model(model)
    from .recipes.teachers import read_prompts, teacher_from
    try:
        return teacher_from(model, read_prompts(prompts) if prompts is not None else None, null_class=null_class,
                            guidance=bool(w))
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None


@main.command("tune")
@click.option("--model", default="mnist-teacher", show_default=True,
              help="A shipped model name (mnist-teacher, mnist-sd, mnist-sd3), a fewstep model folder, or a diffusers "
                   "pipeline folder (the --teacher pipelines of `fewstep distill`).")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Text-to-image pipelines: prompts, one per line (the shipped test-bed pipelines default to their "
                   "prompt suite); every 4th is held out of fitting and scores the held-out error.")
@click.option("--null-class", type=int, default=None,
              help="A class-conditional diffusers UNet's unconditional class id (needed for --w > 0).")
@click.option("--solver", default="dpmpp_2m", show_default=True, callback=_solver_name,
              help="A deterministic one-call-per-step solver.")
@_steps_option(help="Budget of model calls (grid steps) to tune for.  [required]")
@click.option("--nfe", type=click.IntRange(min=1), default=None, hidden=True,
              help="Deprecated name of --steps.")
@click.option("--w", type=float, default=0.0, show_default=True, callback=_guidance_w, help="Guidance weight (>= 0).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Where to write the grid (JSON).")
@click.option("--method", type=click.Choice(["learned", "coeff", "pas", "grid", "dp", "refine", "dp+refine"]),
              default="learned", show_default=True,
              help="learned: a learned solver, per-step coefficients on fitted or fixed times (see --times; "
                   "fewstep.tune_solver's default method); coeff / pas: that method; grid: the times alone, through tune_solver (validation "
                   "split, flow starts); dp / refine / dp+refine: tune_grid's grid methods (GITS dynamic programming, "
                   "LD3's objective by Nelder-Mead, refine from the better start).")
@click.option("--heldout", type=click.IntRange(min=0), default=32, show_default=True,
              help="Held-out noises (seed --seed + 1) whose errors the JSON records (learned / coeff / pas / grid).")
@click.option("--samples", type=click.IntRange(min=2), default=64, show_default=True, help="Calibration noises.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the calibration noises and labels.")
@click.option("--reference-steps", type=click.IntRange(min=2), default=128, show_default=True,
              help="RK4 steps of the reference solve (a second solve with half as many estimates its error).")
@click.option("--candidates", type=click.IntRange(min=2), default=64, show_default=True,
              help="Candidate times for dp (must divide --reference-steps).")
@click.option("--max-evals", type=click.IntRange(min=1), default=None,
              help="Objective evaluations for refine (default 12 * (nfe - 1) + 20).")
@click.option("--free-end", is_flag=True, help="Let the last finite time move too (lower RMSE, blurrier samples); "
              "learned methods move it by default on flow-matching models only.")
@click.option("--times", type=click.Choice(["auto", "tuned", "fixed"]), default="auto", show_default=True,
              help="Learned methods: fit the times with the coefficients (tuned), keep the fixed spacing with the "
                   "lowest calibration error and fit the coefficients alone (fixed: a faster fit), or both, the tuned "
                   "times kept only where they validate better by more than one standard error (auto).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
def tune_cmd(model, prompts, null_class, solver, steps, nfe, w, out, method, heldout, samples, seed, reference_steps,
             candidates, max_evals, free_end, times, threads):
    """Fit a learned solver (default) or a time grid on which --solver with --steps model calls comes closest
    to the converged ODE solution of --model, on calibration noises; write it as JSON (use it with
    `fewstep sample --grid PATH`, `fewstep.sample(..., grid=fewstep.load_grid(PATH))` or
    `FewstepScheduler.from_config(config, grid=PATH)`)."""
    import torch

    from .tune import tune_model
    nfe = _budget_alias(steps, nfe)
    if times == "fixed" and method in ("dp", "refine", "dp+refine", "grid"):
        raise click.UsageError(f"--times fixed keeps the times and fits coefficients; --method {method} fits times "
                               "alone: use --method learned, coeff or pas with it")
    _check_writable(out, file=True)
    torch.set_num_threads(threads)
    m = _tune_target(model, prompts, null_class, w)
    log = lambda msg: click.echo(f"[tune] {msg}", err=True)  # noqa: E731
    try:
        solver_method = method not in ("dp", "refine", "dp+refine")
        extra = {"heldout": heldout, "times": times} if solver_method else {}
        grid = tune_model(m, solver=solver, nfe=nfe, w=w, samples=samples, seed=seed, method=method,
                          reference_steps=reference_steps, candidates=candidates, max_evals=max_evals,
                          free_end=free_end or (None if solver_method else False), log=log, **extra)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    path = grid.save(out)
    cal = grid.calibration
    held = f"; held-out RMSE {grid.heldout['rmse']:.4g} (times alone {grid.heldout['grid_alone']:.4g}, best fixed " \
           f"spacing {grid.heldout['best_fixed']:.4g})" if grid.heldout else ""
    click.echo(f"wrote {path}: {grid.method} {solver}, {nfe} model calls; calibration RMSE {cal['rmse']:.4g} (best "
               f"fixed spacing {min(cal['fixed_spacings'].values()):.4g}){held}; "
               f"{grid.cost['model_calls'] + grid.cost['reference_model_calls']} model calls, "
               f"{grid.cost['seconds'] + grid.cost['reference_seconds']:.0f} s")


if __name__ == "__main__":
    main()
