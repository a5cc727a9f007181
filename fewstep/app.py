"""``fewstep app``: a local web page that puts a fast sampler beside the teacher's 50-step images.

Pick a shipped model, a sampler, steps, guidance w, classes and a seed; the page shows the
chosen sampler's images next to the teacher's (``mnist-teacher``, DDIM, 50 steps) for the
same w, classes and seeds, with network evaluations and seconds per image for each and the
speed-up. It needs the optional extra ``pip install "fewstep[app]"`` (Gradio) and serves on
127.0.0.1 only.

:func:`compare` is the page's work as a plain function (no server needed); :func:`build_app`
makes the Gradio page and :func:`launch` serves it.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict

import numpy as np
import torch

__all__ = ["TEACHER", "REFERENCE_STEPS", "MAX_IMAGES", "app_models", "parse_classes", "compare", "build_app",
           "launch"]

TEACHER = "mnist-teacher"
REFERENCE_STEPS = 50  # the teacher reference: DDIM at this many steps (the page's default)
MAX_IMAGES = 20
HOST = "127.0.0.1"
_GENERATIVE = ("diffusion", "student", "generator")
_SCALE = 3  # pixels per MNIST pixel in the returned grids

_models: dict = {}
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


def _controls_for(model_name: str):
    """UI updates for the solver and steps controls: enabled only for diffusion models."""
    import gradio as gr
    kind = app_models().get(model_name)
    active = kind == "diffusion"
    info = ("" if active else f"{model_name} samples with its own fixed steps: solver and steps are ignored.")
    return gr.update(interactive=active), gr.update(interactive=active), info


def build_app(reference_steps: int | None = None):
    """The Gradio page (a ``gr.Blocks``); its button's API endpoint is ``/compare``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from .solvers import SOLVERS
    ref_steps = _default_reference_steps() if reference_steps is None else int(reference_steps)
    models = list(app_models())
    if not models:
        raise RuntimeError("no shipped generative model in this installation")
    first = TEACHER if TEACHER in models else models[0]

    def run(model_name, solver, steps, w, classes_text, seed):
        return compare(model_name, solver, steps, w, classes_text, seed, reference_steps=ref_steps)

    with gr.Blocks(title="fewstep: fast sampling") as demo:
        gr.Markdown("# fewstep: a fast sampler beside the teacher\n"
                    f"Left: the chosen model and sampler. Right: the teacher ({TEACHER}) with DDIM at {ref_steps} "
                    "steps, at the same w, classes and seeds. Everything runs on this machine.")
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
                mine = gr.Image(label="chosen sampler", format="png", image_mode="L", type="numpy",
                                interactive=False)
                teacher = gr.Image(label=f"teacher, DDIM {ref_steps} steps", format="png", image_mode="L",
                                   type="numpy", interactive=False)
                table = gr.Markdown(label="evaluations and timings")
        hidden = ({"api_visibility": "private"} if int(gr.__version__.split(".")[0]) >= 6 else {"show_api": False})
        model.change(_controls_for, inputs=model, outputs=[solver, steps, note], **hidden)
        go.click(run, inputs=[model, solver, steps, w, classes, seed], outputs=[mine, teacher, table],
                 api_name="compare")
    return demo


def _check_host(host: str) -> None:
    if host not in (HOST, "localhost"):
        raise ValueError(f"fewstep app serves on {HOST} only, not {host!r}")


def launch(port: int | None = None, share: bool = False, *, host: str = HOST, prevent_thread_lock: bool = False,
           reference_steps: int | None = None, quiet: bool = False):
    """Serve the page on 127.0.0.1 (``port``: None picks a free one from 7860). Never shares publicly.
    Returns (blocks, local_url); with ``prevent_thread_lock=True`` it returns at once (``blocks.close()`` stops
    the server), otherwise it blocks until interrupted."""
    if share:
        raise ValueError("fewstep app never shares the page publicly (share=True); it serves on 127.0.0.1 only")
    _check_host(host)
    demo = build_app(reference_steps)
    _, url, _ = demo.launch(server_name=HOST, server_port=port, share=False, inbrowser=False,
                            prevent_thread_lock=True, quiet=True, show_error=True)
    if not quiet:
        print(f"fewstep app: {url} (this machine only; Ctrl+C to stop)", flush=True)
    if not prevent_thread_lock:
        demo.block_thread()  # until Ctrl+C, then the server closes
    return demo, url
