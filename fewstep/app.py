"""``fewstep app``: a local web page that puts a fast sampler beside the teacher's 50-step images.

Pick a shipped model, a sampler, steps, guidance w, classes and a seed; the page shows the
chosen sampler's images next to the teacher's (``mnist-teacher``, DDIM, 50 steps) for the
same w, classes and seeds, with network evaluations and seconds per image for each and the
speed-up. It needs the optional extra ``pip install "fewstep[app]"`` (Gradio) and serves on
127.0.0.1 only.

A second tab, text-to-image, takes prompts of the test bed's grammar (:mod:`fewstep.data.captions`;
a prompt outside it is a one-line error) and puts the same methods as ``fewstep demo``'s text-to-image
row side by side on the same prompts and seeds: ``mnist-sd`` with its stock scheduler at 50 steps, with
fewstep's solver at 5 steps, and each shipped distilled student pipeline (``mnist-sd-guided-4``,
``mnist-sd-dmd-1-anneal``) with its own scheduler and steps.

:func:`compare` and :func:`compare_text` are the page's work as plain functions (no server needed);
:func:`build_app` makes the Gradio page and :func:`launch` serves it.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .evaluate import TEXT_STUDENTS, TEXT_TEACHER, TextMethod
from .evaluate import text_methods as shared_text_methods

__all__ = ["TEACHER", "REFERENCE_STEPS", "MAX_IMAGES", "app_models", "parse_classes", "compare", "build_app",
           "launch", "TEXT_TEACHER", "TEXT_STUDENTS", "TEXT_W", "SOLVER_STEPS", "TextMethod", "text_methods",
           "parse_prompt_lines", "compare_text"]

TEACHER = "mnist-teacher"
REFERENCE_STEPS = 50  # the teacher reference: DDIM at this many steps (the page's default)
MAX_IMAGES = 20
HOST = "127.0.0.1"
_GENERATIVE = ("diffusion", "student", "generator")
_SCALE = 3  # pixels per MNIST pixel in the returned grids

TEXT_W = 2.0  # the text tab's default guidance w (guidance_scale 3, as fewstep demo's text-to-image row)
SOLVER_STEPS = 5  # fewstep's solver in the teacher pipeline

_models: dict = {}
_pipelines: dict = {}
_reference_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()


def _default_reference_steps() -> int:
    """50, or ``FEWSTEP_APP_REFERENCE_STEPS`` (meant for fast tests only)."""
    value = os.environ.get("FEWSTEP_APP_REFERENCE_STEPS")
    return int(value) if value else REFERENCE_STEPS


def _kind(name: str) -> str | None:
    from .api import ASSETS
    from .nets import read_config
    return read_config(ASSETS / name).get("kind")


def app_models() -> dict[str, str]:
    """The shipped generative models (diffusion models, distilled students, DMD generators) and their kind;
    the classifier and the encoders do not generate, so they are left out."""
    from .api import SHIPPED
    kinds = {name: _kind(name) for name in SHIPPED}
    return {name: kind for name, kind in kinds.items() if kind in _GENERATIVE}


def _model(name: str):
    from .api import load
    if name not in _models:
        from .api import generate
        model = load(name)
        fixed = app_models().get(name) != "diffusion"
        generate(model, [0], solver=None if fixed else "ddim", steps=None if fixed else 1)  # warm-up: fair timings
        _models[name] = model
    return _models[name]


def parse_classes(text) -> list[int]:
    """Class ids from text such as ``"0, 1, 7"``, ``"0 1 7"`` or ``"0-9"`` (a range); ValueError with a readable
    message otherwise."""
    items = [s for s in re.split(r"[,\s;]+", str(text or "").strip()) if s]
    if not items:
        raise ValueError("give at least one class, e.g. 0,1,2 or 0-9")
    out = []
    for item in items:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError(f"class range {item!r} runs backwards; write {hi}-{lo}")
            out.extend(range(lo, hi + 1))
        elif item.isdigit():
            out.append(int(item))
        else:
            raise ValueError(f"classes must be whole numbers 0-9 separated by commas, got {item!r}")
    bad = [c for c in out if not 0 <= c <= 9]
    if bad:
        raise ValueError(f"classes must lie in 0-9, got {bad[0]}")
    if len(out) > MAX_IMAGES:
        raise ValueError(f"at most {MAX_IMAGES} images at a time, got {len(out)} classes")
    return out


def _number(value, what: str, cast, lo=None, hi=None):
    try:
        x = cast(float(value)) if cast is int else cast(value)
        if cast is int and float(value) != x:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not np.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got {value!r}")
    return x


def _grid(images: torch.Tensor, cols: int = 10) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> one uint8 grey image, ``cols`` digits per row, 2-pixel gaps, scaled up."""
    n, _, h, w = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    gap = 2
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap), 255, dtype=np.uint8)
    pix = ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = pix[i]
    return np.kron(canvas, np.ones((_SCALE, _SCALE), dtype=np.uint8))


def _evaluations(model, solver, steps, w: float, calls: int) -> int:
    """Network evaluations per image, the model's own count (``evaluations``: a classifier-free guided call
    counts two). Adaptive solvers: from the calls counted while sampling."""
    return model.evaluations(solver, steps, w, calls=calls)


def _run(model, labels: list[int], *, w: float, solver, steps, seed: int) -> tuple[torch.Tensor, int, float]:
    """Generate one batch; returns (images, network evaluations per image, seconds per image)."""
    from .api import generate
    solver, steps = model.check_sampling(solver, steps, w)
    calls = [0]
    hook = model.net.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        t0 = time.perf_counter()
        images = generate(model, labels, w=w, solver=solver, steps=steps, seed=seed)
        seconds = (time.perf_counter() - t0) / len(labels)
    finally:
        hook.remove()
    return images, _evaluations(model, solver, steps, w, calls[0]), seconds


def _reference(labels: list[int], w: float, seed: int, steps: int) -> tuple[np.ndarray, int, float, bool]:
    """The teacher's DDIM images for (w, classes, seed, steps), cached; returns (grid, evals, s/image, cached)."""
    key = (float(w), tuple(labels), int(seed), int(steps))
    if key in _reference_cache:
        _reference_cache.move_to_end(key)
        return (*_reference_cache[key], True)
    images, evals, seconds = _run(_model(TEACHER), labels, w=w, solver="ddim", steps=steps, seed=seed)
    _reference_cache[key] = (_grid(images), evals, seconds)
    while len(_reference_cache) > 32:
        _reference_cache.popitem(last=False)
    return (*_reference_cache[key], False)


def _fmt_seconds(s: float) -> str:
    return f"{s:.4f}" if s < 10 else f"{s:.1f}"


def compare(model_name: str, solver: str | None, steps, w, classes_text, seed, *,
            reference_steps: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The page's work: ``model_name`` with ``solver``/``steps`` beside the teacher's DDIM reference
    (``reference_steps``, default 50) at the same w, classes and seed.

    Returns (image grid, teacher grid, markdown) with the grids as uint8 (H, W) arrays, one digit per class in
    order. Bad input gives (None, None, an error message) instead of raising. ``solver`` and ``steps`` only
    apply to diffusion models; distilled students and DMD generators use their own sampler and step count.
    """
    try:
        return _compare(model_name, solver, steps, w, classes_text, seed, reference_steps)
    except (ValueError, TypeError, FileNotFoundError) as e:
        return None, None, f"**Error:** {e}"


def _compare(model_name, solver, steps, w, classes_text, seed, reference_steps):
    from .solvers import SOLVERS
    models = app_models()
    if model_name not in models:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(models)}")
    kind = models[model_name]
    labels = parse_classes(classes_text)
    w = _number(w, "guidance w", float, 0.0, 4.0)
    seed = _number(seed, "seed", int, 0, 2 ** 31 - 1)
    ref_steps = _default_reference_steps() if reference_steps is None else int(reference_steps)
    notes = []
    with _lock:
        model = _model(model_name)
        if kind == "diffusion":
            if solver not in SOLVERS:
                raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
            steps = _number(steps, "steps", int, 1, 200)
            label = f"{model_name}, {solver}, {steps} steps"
        else:
            solver, steps = None, None  # students and generators sample with their own grid and step count
            label = f"{model_name}, its own {model.default_steps}-step sampler"
            notes.append(f"{model_name} is a distilled {kind}: it samples with its own {model.default_steps}-step "
                         "sampler, so the solver and steps settings do not apply.")
            if kind == "generator":
                baked = float(model.config.get("real_w", 0.0))
                if w != baked:
                    notes.append(f"{model_name} has guidance w = {baked:g} baked in; both sides use w = {baked:g}.")
                w = baked
        images, evals, seconds = _run(model, labels, w=w, solver=solver, steps=steps, seed=seed)
        ref, ref_evals, ref_seconds, cached = _reference(labels, w, seed, ref_steps)
    speedup = ref_seconds / seconds if seconds > 0 else float("inf")
    evals_ratio = ref_evals / evals if evals else float("inf")
    lines = [f"w = {w:g}, classes {', '.join(map(str, labels))}, seed {seed} ({len(labels)} images per side)", "",
             "| sampler | network evaluations / image | seconds / image |", "|---|---|---|",
             f"| {label} | {evals} | {_fmt_seconds(seconds)} |",
             f"| {TEACHER}, ddim, {ref_steps} steps (reference) | {ref_evals} | {_fmt_seconds(ref_seconds)} |", "",
             f"**Speed-up over the reference: {speedup:.1f}x** in seconds per image, {evals_ratio:.1f}x in network "
             "evaluations."]
    if model.evaluations_per_call(w) == 2:
        notes.append("A guided step of a CFG model counts two network evaluations (conditional + unconditional).")
    if cached:
        notes.append("The reference came from the cache (timed when it was first made).")
    lines += [""] + [f"- {n}" for n in notes]
    return _grid(images), ref, "\n".join(lines)


# -- text-to-image ----------------------------------------------------------------------------------------------

def text_methods(*, students=None, reference_steps: int | None = None) -> list[TextMethod]:
    """The text tab's methods (:func:`fewstep.evaluate.text_methods`): ``mnist-sd`` with its stock scheduler at
    ``reference_steps`` (default 50) and with fewstep's default solver at :data:`SOLVER_STEPS`, then each student
    of :data:`TEXT_STUDENTS` (a pipeline folder of that name under ``students``, default the shipped assets;
    ``folder`` None when absent). [] when ``mnist-sd`` is not shipped."""
    steps = _default_reference_steps() if reference_steps is None else int(reference_steps)
    return shared_text_methods(teacher_steps=steps, solver_steps=SOLVER_STEPS, students=students,
                               labels=("{teacher}, stock {stock}, {steps} steps (reference)",
                                       "{teacher}, fewstep {solver}, {steps} steps"))


def parse_prompt_lines(text) -> list[str]:
    """Prompts from text, one per line (blank lines dropped), each in the test bed's grammar
    (:func:`fewstep.data.captions.check_prompt`: a one-line ValueError otherwise); 1 to MAX_IMAGES of them."""
    from .data.captions import check_prompt
    prompts = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one prompt, e.g. a thick seven")
    if len(prompts) > MAX_IMAGES:
        raise ValueError(f"at most {MAX_IMAGES} prompts at a time, got {len(prompts)}")
    return [check_prompt(p) for p in prompts]


def _pipeline(folder: Path):
    """The stock pipeline of ``folder``, loaded once and warmed up (one prompt, one step): fair timings."""
    from .evaluate import generate_prompted, load_text_pipeline
    if folder not in _pipelines:
        pipe = load_text_pipeline(folder)
        generate_prompted(pipe, ["a thick seven"], steps=1, guidance_scale=1.0)
        _pipelines[folder] = pipe
    return _pipelines[folder]


def _run_text(method: TextMethod, prompts: list[str], w: float, seed: int) -> tuple[torch.Tensor, float, float]:
    """(images (N, 1, H, W) in [-1, 1], network evaluations per image, seconds per image) of one method."""
    from .evaluate import generate_prompted, make_scheduler
    pipe = _pipeline(method.folder)
    own = pipe.scheduler
    if method.scheduler != "own":
        pipe.scheduler = make_scheduler(method.scheduler, own)
    try:
        images, seconds, evals = generate_prompted(pipe, prompts, steps=method.steps, seed=seed,
                                                   guidance_scale=method.guidance_scale(w),
                                                   batch_size=len(prompts))
    finally:
        pipe.scheduler = own
    return images, evals, seconds / len(prompts)


def compare_text(prompts_text, w, seed, *, reference_steps: int | None = None,
                 students=None) -> tuple[list[np.ndarray | None], str]:
    """The text tab's work: the prompts (one per line) through every shipped method of :func:`text_methods`
    with the same seed. Returns (one uint8 grid per shipped method, in order, one digit per prompt; markdown
    with network evaluations, seconds per image and the speed-up over the first method). Bad input gives
    ([None] * methods, an error message) instead of raising."""
    shown = 0
    try:
        methods = text_methods(students=students, reference_steps=reference_steps)
        shown = sum(m.folder is not None for m in methods)
        return _compare_text(prompts_text, w, seed, methods)
    except (ValueError, TypeError, FileNotFoundError) as e:
        return [None] * shown, f"**Error:** {e}"


def _compare_text(prompts_text, w, seed, methods: list[TextMethod]):
    if not methods:
        raise FileNotFoundError(f"{TEXT_TEACHER} is not shipped in this version")
    prompts = parse_prompt_lines(prompts_text)
    w = _number(w, "guidance w", float, 0.0, 4.0)
    seed = _number(seed, "seed", int, 0, 2 ** 31 - 1)
    grids, rows, notes = [], [], []
    with _lock:
        for m in methods:
            if m.folder is None:
                notes.append(f"{m.label} ({m.model}) is not shipped yet.")
                continue
            images, evals, seconds = _run_text(m, prompts, w, seed)
            grids.append(_grid(images))
            rows.append((m, evals, seconds))
    base = rows[0][2]
    lines = [f"w = {w:g} (guidance_scale {1 + w:g}), seed {seed}, {len(prompts)} prompt"
             f"{'s' if len(prompts) != 1 else ''} per method", "",
             "| method | speed-up | network evaluations / image | seconds / image |", "|---|---|---|---|"]
    lines += [f"| {m.label} | {base / secs:.1f}x | {evals:g} | {_fmt_seconds(secs)} |" for m, evals, secs in rows]
    notes.append("A guided teacher step counts two network evaluations (conditional + unconditional); a guided "
                 "student takes w as an input (one per step); a DMD generator has its w baked in.")
    lines += [""] + [f"- {n}" for n in notes]
    return grids, "\n".join(lines)


def _controls_for(model_name: str):
    """UI updates for the solver and steps controls: enabled only for diffusion models."""
    import gradio as gr
    kind = app_models().get(model_name)
    active = kind == "diffusion"
    info = ("" if active else f"{model_name} samples with its own fixed steps: solver and steps are ignored.")
    return gr.update(interactive=active), gr.update(interactive=active), info


def build_app(reference_steps: int | None = None, *, students=None):
    """The Gradio page (a ``gr.Blocks``) with two tabs; the API endpoints are ``/compare`` (class-conditional)
    and ``/compare_text`` (text-to-image: one image per shipped method, then the table). ``students``: the
    folder of the text-to-image student pipelines (default: the shipped assets)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    ref_steps = _default_reference_steps() if reference_steps is None else int(reference_steps)
    models = list(app_models())
    if not models:
        raise RuntimeError("no shipped generative model in this installation")
    with gr.Blocks(title="fewstep: fast sampling") as demo:
        gr.Markdown("# fewstep: a fast sampler beside the teacher\nEverything runs on this machine.")
        with gr.Tab("class-conditional"):
            _class_tab(gr, models, ref_steps)
        methods = [m for m in text_methods(students=students, reference_steps=ref_steps) if m.folder is not None]
        if methods:
            with gr.Tab("text-to-image"):
                _text_tab(gr, methods, ref_steps, students)
    return demo


def _hidden_api(gr) -> dict:
    return {"api_visibility": "private"} if int(gr.__version__.split(".")[0]) >= 6 else {"show_api": False}


def _class_tab(gr, models: list[str], ref_steps: int) -> None:
    from .solvers import SOLVERS
    first = TEACHER if TEACHER in models else models[0]

    def run(model_name, solver, steps, w, classes_text, seed):
        return compare(model_name, solver, steps, w, classes_text, seed, reference_steps=ref_steps)

    gr.Markdown(f"Left: the chosen model and sampler. Right: the teacher ({TEACHER}) with DDIM at {ref_steps} "
                "steps, at the same w, classes and seeds.")
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(models, value=first, label="model")
            solver = gr.Dropdown(list(SOLVERS), value="dpmpp_2m", label="solver (diffusion models only)")
            steps = gr.Slider(1, 100, value=10, step=1, label="steps (diffusion models only)")
            note = gr.Markdown("")
            w = gr.Slider(0.0, 4.0, value=1.0, step=0.1, label="guidance w (x_w = (1 + w) x_cond - w x_uncond)")
            classes = gr.Textbox("0,1,2,3,4,5,6,7,8,9", label="classes (0-9, comma-separated; ranges like 0-9)")
            seed = gr.Number(0, precision=0, minimum=0, label="seed")
            go = gr.Button("Generate", variant="primary")
        with gr.Column(scale=2):
            mine = gr.Image(label="chosen sampler", format="png", image_mode="L", type="numpy", interactive=False)
            teacher = gr.Image(label=f"teacher, DDIM {ref_steps} steps", format="png", image_mode="L",
                               type="numpy", interactive=False)
            table = gr.Markdown(label="evaluations and timings")
    model.change(_controls_for, inputs=model, outputs=[solver, steps, note], **_hidden_api(gr))
    go.click(run, inputs=[model, solver, steps, w, classes, seed], outputs=[mine, teacher, table],
             api_name="compare")


def _text_tab(gr, methods: list[TextMethod], ref_steps: int, students) -> None:
    def run(prompts_text, w, seed):
        grids, md = compare_text(prompts_text, w, seed, reference_steps=ref_steps, students=students)
        return (*grids, md)

    gr.Markdown(f"The same prompts and seeds through {TEXT_TEACHER}'s stock pipeline call: its own scheduler at "
                f"{ref_steps} steps, fewstep's solver at {SOLVER_STEPS} steps and each shipped distilled student. "
                "Prompts follow the test bed's grammar: `a [handwritten|thin|thick] <digit> [slanted left|right]`.")
    with gr.Row():
        with gr.Column(scale=1):
            prompts = gr.Textbox("a thick seven\na thin two slanted left\na handwritten zero", lines=5,
                                 label=f"prompts, one per line (at most {MAX_IMAGES})")
            w = gr.Slider(0.0, 4.0, value=TEXT_W, step=0.1, label="guidance w (guidance_scale = 1 + w)")
            seed = gr.Number(0, precision=0, minimum=0, label="seed")
            go = gr.Button("Compare methods", variant="primary")
        with gr.Column(scale=2):
            images = [gr.Image(label=m.label, format="png", image_mode="L", type="numpy", interactive=False)
                      for m in methods]
            table = gr.Markdown(label="evaluations and timings")
    go.click(run, inputs=[prompts, w, seed], outputs=[*images, table], api_name="compare_text")


def _check_host(host: str) -> None:
    if host not in (HOST, "localhost"):
        raise ValueError(f"fewstep app serves on {HOST} only, not {host!r}")


def launch(port: int | None = None, share: bool = False, *, host: str = HOST, prevent_thread_lock: bool = False,
           reference_steps: int | None = None, quiet: bool = False, students=None):
    """Serve the page on 127.0.0.1 (``port``: None picks a free one from 7860). Never shares publicly.
    Returns (blocks, local_url); with ``prevent_thread_lock=True`` it returns at once (``blocks.close()`` stops
    the server), otherwise it blocks until interrupted. ``students``: as :func:`build_app`."""
    if share:
        raise ValueError("fewstep app never shares the page publicly (share=True); it serves on 127.0.0.1 only")
    _check_host(host)
    demo = build_app(reference_steps, students=students)
    _, url, _ = demo.launch(server_name=HOST, server_port=port, share=False, inbrowser=False,
                            prevent_thread_lock=True, quiet=True, show_error=True)
    if not quiet:
        print(f"fewstep app: {url} (this machine only; Ctrl+C to stop)", flush=True)
    if not prevent_thread_lock:
        demo.block_thread()  # until Ctrl+C, then the server closes
    return demo, url
