"""The benchmark's report: the issue's targets, the markdown tables and the plot."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .overhead import OVERHEAD_PAIRS

__all__ = ["check_targets", "defaults_check", "DEFAULT_SPACING", "best_spacings", "summary_keys", "markdown", "plot", "DEFAULT_SOLVERS",
           "DEFAULT_NFES_CHECKED"]

MAIN_PLOT_SOLVERS = ("ddim", "dpmpp_2m", "unipc_bh2_2")  # always on the left panel, beside the 5 best
# target 1 counts ties within float32 round-off as met: fewstep <= diffusers * (1 + rtol) + atol
PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-6
UNRANKED = "†"  # marks an error within 10x of the reference's own error: not ranked
# the solvers whose defaults (default spacing and final step, no tuning) must never lose to diffusers'
# default scheduler: fewstep.sample's default and the README's picks
DEFAULT_SOLVERS = ("unipc_bh2_3", "unipc_bh2_2", "dpmpp_2m", "dpmpp_3m")
DEFAULT_SPACING = "logsnr"
DEFAULT_NFES_CHECKED = (4, 5, 6, 8, 10, 15, 20)


def floor_of(doc: dict) -> float:
    """Errors below this (10x the reference's own error estimate) are not ranked: they tie at it."""
    return float(doc.get("reference", {}).get("unranked_below", 0.0))


def _index(rows) -> dict:
    return {(r["impl"], r["solver"], r["spacing"], r["nfe"]): r["rmse"] for r in rows}


def check_targets(doc: dict, nfes) -> list[dict]:
    """The three targets of the issue, each {"target", "met" (True/False/None), "summary", "header", "lines"}."""
    rows = doc["results"]
    return [_target_parity(_index(rows), nfes), _target_best(rows, _index(rows), floor_of(doc)),
            defaults_check(rows, nfes, floor_of(doc)), _target_overhead(rows)]


def defaults_check(rows, nfes, floor: float = 0.0, baseline=("DPMSolverMultistepScheduler", "default"),
                   spacing: str = DEFAULT_SPACING) -> dict:
    """Each of ``DEFAULT_SOLVERS`` on its default grid against diffusers' default scheduler at every NFE of
    ``DEFAULT_NFES_CHECKED`` measured: ratio <= 1 everywhere and <= 0.5 at NFE 10 (errors below ``floor`` tie)."""
    idx = _index(rows)
    lines, ok, seen = [], [], False
    for solver in DEFAULT_SOLVERS:
        cells = []
        for n in nfes:
            f, d = idx.get(("fewstep", solver, spacing, n)), idx.get(("diffusers", *baseline, n))
            if f is None or d is None:
                cells.append("-")
                continue
            seen = True
            ratio = max(f, floor) / max(d, floor)
            if n in DEFAULT_NFES_CHECKED:
                ok.append(ratio <= (0.5 if n == 10 else 1.0) * (1 + PARITY_RTOL))
            cells.append(f"{f:.3g} ({ratio:.2f}x)")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    base = [idx.get(("diffusers", *baseline, n)) for n in nfes]
    lines.append(f"| diffusers {baseline[0]} ({baseline[1]}) | " + " | ".join("-" if b is None else f"{b:.3g}"
                                                                              for b in base) + " |")
    return {"target": f"every default (solver in {', '.join(DEFAULT_SOLVERS)}, spacing {spacing}, final zero) <= "
                      f"diffusers' default {baseline[0]} at NFE {', '.join(map(str, DEFAULT_NFES_CHECKED))} and "
                      "<= 0.5x at NFE 10",
            "met": (all(ok) if ok else None) if seen else None, "lines": lines,
            "header": "| fewstep solver (default grid) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
            "summary": f"RMSE (ratio to diffusers' default); {sum(ok)} of {len(ok)} checks met"}


def _target_parity(idx, nfes) -> dict:
    """fewstep dpmpp_2m vs DPMSolverMultistepScheduler on diffusers' grids. Only the default grid is
    identical on both sides: with Karras / Lu-lambda sigmas diffusers evaluates the model at the
    timesteps rounded to integers but steps with the unrounded sigmas, while fewstep evaluates the
    model at the grid's own times; those rows are listed but left out of the verdict."""
    comps = []
    for fs, ds in (("diffusers_default", "default"), ("diffusers_karras", "karras"),
                   ("diffusers_lu_lambdas", "lu_lambdas")):
        for n in nfes:
            f, d = idx.get(("fewstep", "dpmpp_2m", fs, n)), idx.get(("diffusers", "DPMSolverMultistepScheduler", ds, n))
            if f is not None and d is not None:
                comps.append((ds, n, f, d))
    exact = [c for c in comps if c[0] == "default"]
    near = [c[2] / c[3] for c in comps if c[0] != "default"]
    met = all(f <= d * (1 + PARITY_RTOL) + PARITY_ATOL for _, _, f, d in exact) if exact else None
    summary = "not measured"
    if exact:
        summary = (f"identical grid (diffusers' default timesteps): worst ratio "
                   f"{max(f / d for _, _, f, d in exact):.4f} over {len(exact)} NFEs; ties within float32 round-off "
                   f"(ratio <= {1 + PARITY_RTOL:g} or +{PARITY_ATOL:g}) count as met.")
    if near:
        summary += (f" Karras / Lu-lambda grids (not identical: diffusers evaluates the model at rounded integer "
                    f"timesteps, fewstep at the grid's own times; not in the verdict): ratio {min(near):.3f} to "
                    f"{max(near):.3f}, fewstep lower in {sum(r < 1 for r in near)} of {len(near)}.")
    return {"target": "fewstep dpmpp_2m <= diffusers DPMSolverMultistepScheduler on the same grid", "met": met,
            "summary": summary, "header": "| diffusers grid | identical | NFE | fewstep dpmpp_2m | diffusers | ratio |",
            "lines": [f"| {ds} | {'yes' if ds == 'default' else 'no (rounded model timesteps)'} | {n} | {f:.3e} | "
                      f"{d:.3e} | {f / d:.4f} |" for ds, n, f, d in comps]}


def _target_best(rows, idx, floor: float = 0.0) -> dict:
    lines, met = [], []
    for n in (5, 10):
        d = idx.get(("diffusers", "DPMSolverMultistepScheduler", "default", n))
        cands = [r for r in rows
                 if r["impl"] == "fewstep" and r["nfe"] == n and not r["spacing"].startswith("adaptive")]
        if d is None or not cands:
            lines.append(f"| {n} | not measured | | | |")
            continue
        best = min(cands, key=lambda r: max(r["rmse"], floor))
        met.append(max(best["rmse"], floor) <= 0.5 * d)
        mark = f" {UNRANKED} (below the reference's resolution; bounded by {floor:.1e})" if best["rmse"] < floor else ""
        lines.append(f"| {n} | {best['solver']} ({best['spacing']}) | {best['rmse']:.3e}{mark} | {d:.3e} | "
                     f"{max(best['rmse'], floor) / d:.3f} |")
    return {"target": "best fewstep solver at NFE 5 and 10 <= 0.5 x diffusers' default DPMSolverMultistepScheduler",
            "met": all(met) if len(met) == 2 else None, "lines": lines,
            "header": "| NFE | best fewstep (spacing) | its RMSE | diffusers default | ratio |",
            "summary": "ratio = best fewstep RMSE (any ODE solver and spacing at exactly that NFE) / diffusers "
                       "default RMSE; target <= 0.5" + ("" if len(met) == 2 else "; measured only partly")}


def _target_overhead(rows) -> dict:
    us = {(r["impl"], r["solver"]): r["overhead_us_per_step"] for r in rows if r["overhead_us_per_step"] is not None}
    lines, head = [], None
    for solver, name in OVERHEAD_PAIRS:
        f, d = us.get(("fewstep", solver)), us.get(("diffusers", name))
        if f is None and d is None:
            continue
        ratio = f"{f / d:.3f}" if f is not None and d is not None else "n/a"
        lines.append(f"| {solver or '-'} | {name or '-'} | {_us(f)} | {_us(d)} | {ratio} |")
        if solver == "dpmpp_2m" and f is not None and d is not None:
            head = f / d
    return {"target": "solver overhead per step: fewstep dpmpp_2m <= 0.5 x diffusers "
                      "DPMSolverMultistepScheduler.step()",
            "met": None if head is None else head <= 0.5, "lines": lines,
            "header": "| fewstep solver | diffusers scheduler | fewstep us/step | diffusers us/step | ratio |",
            "summary": f"headline ratio (dpmpp_2m / DPMSolverMultistepScheduler) = {head:.3f}"
                       if head else "not measured"}


def _us(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _verdict(met) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]


def best_spacings(rows, floor: float = 0.0) -> dict:
    """(impl, solver) -> the spacing with the lowest geometric-mean RMSE over the NFEs it ran
    (adaptive rows excluded; diffusers rows keep every configuration; errors below ``floor`` tie)."""
    groups: dict = {}
    for r in rows:
        if not r["spacing"].startswith("adaptive"):
            groups.setdefault((r["impl"], r["solver"], r["spacing"]), []).append(max(r["rmse"], floor, 1e-300))
    best: dict = {}
    for (impl, solver, spacing), errs in groups.items():
        score = sum(math.log(e) for e in errs) / len(errs)
        if (impl, solver) not in best or score < best[(impl, solver)][1]:
            best[(impl, solver)] = (spacing, score)
    return {k: v[0] for k, v in best.items()}


def _cell(series: dict, col: int, floor: float = 0.0) -> str:
    """The row's RMSE with at most ``col`` calls: exact NFE, or the largest below, marked (nfe);
    marked UNRANKED when below ``floor``."""
    under = [n for n in series if n <= col]
    if not under:
        return "-"
    n = max(under)
    value = f"{series[n]:.2e}" + (f" {UNRANKED}" if series[n] < floor else "")
    return value if n == col else f"{value} ({n})"


def _table(rows, keys, nfes, floor: float = 0.0) -> list[str]:
    lines = ["| impl | solver | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|---|" + "---|" * len(nfes)]
    for impl, solver, spacing in keys:
        series = {r["nfe"]: r["rmse"] for r in rows
                  if (r["impl"], r["solver"], r["spacing"]) == (impl, solver, spacing)}
        lines.append(f"| {impl} | {solver} | {spacing} | " + " | ".join(_cell(series, n, floor) for n in nfes) + " |")
    return lines


def summary_keys(rows, floor: float = 0.0) -> list[tuple]:
    """fewstep solvers at their best spacing (sorted by geometric-mean error, errors below ``floor`` tied at it)
    and every diffusers configuration."""
    best = best_spacings(rows, floor)
    fkeys = [("fewstep", s, sp) for (impl, s), sp in best.items() if impl == "fewstep"]
    dkeys = list(dict.fromkeys((r["impl"], r["solver"], r["spacing"]) for r in rows if r["impl"] == "diffusers"))
    gm = {k: statistics.fmean(math.log(max(r["rmse"], floor, 1e-300)) for r in rows
                              if (r["impl"], r["solver"], r["spacing"]) == k) for k in fkeys}
    return sorted(fkeys, key=gm.get) + dkeys


def markdown(doc: dict, extras: dict, png_name: str) -> str:
    rows, nfes, m, ref = doc["results"], extras["nfes"], doc["machine"], doc["reference"]
    out = [f"# Solver benchmark ({'quick' if extras['quick'] else 'full'})", "",
           f"Generated by `{extras['command']}` (fewstep.bench.solvers) on {m['date']}.", "",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
           f"diffusers {m['diffusers']}, Python {m['python']}; load average at start {m['load_average_at_start']} "
           f"(shared machine); wall time {m['wall_time_s']} s.",
           f"- Model: {doc['model'].get('name')} - {doc['model'].get('description', '')}; w = {doc['model'].get('w')}; "
           f"{doc['model'].get('samples')} samples, seed {doc['model'].get('seed')}.",
           f"- Reference: {ref['method']}, {ref['steps']} steps, {ref['end']}. Convergence: {ref['convergence']}.",
           f"- The reference's own error is about {ref.get('error_estimate', 0):.2g}; an error below "
           f"{floor_of(doc):.2g} (within 10x of it) is marked {UNRANKED} and not ranked (it ties at that bound).",
           "- RMSE over all samples and pixels (data in [-1, 1]) against the reference from the same x_T. "
           "NFE = model calls counted.", "", "## Targets", ""]
    for t in check_targets(doc, nfes):
        out += [f"### {t['target']}: {_verdict(t['met'])}", "", t["summary"], "", t["header"],
                "|" + "---|" * (t["header"].count(" | ") + 1), *t["lines"], ""]
    out += [f"fewstep dpmpp_2m through the eps adapter (ModelDenoiser on a cached eps model, the path of an "
            f"eps-prediction model): {extras['adapter_overhead_us']:.0f} us/step. Overhead: tensor (8, 4, 64, 64) "
            f"float32, {extras['overhead_steps']} steps, median of {extras['overhead_repeats']} alternating repeats; "
            "fewstep = the whole sampler on a cached denoiser, diffusers = step() alone.", "",
            "## RMSE by NFE", "", "fewstep solvers at their best spacing (lowest geometric-mean RMSE), then every "
            "diffusers configuration. A value marked (n) spent n < NFE calls (Heun's 2 steps - 1).", ""]
    floor = floor_of(doc)
    out += _table(rows, summary_keys(rows, floor), nfes, floor) + ["", f"![error vs NFE]({png_name})", ""]
    for name, other in doc.get("defaults_check", {}).items():
        c = other["check"]
        out += [f"## Defaults on {name} ({other['model']['samples']} samples): {_verdict(c['met'])}", "",
                other["model"].get("description", ""), "", c["summary"], "", c["header"],
                "|" + "---|" * (c["header"].count(" | ") + 1), *c["lines"], ""]
    adaptive = [r for r in rows if r["spacing"].startswith("adaptive")]
    if adaptive:
        out += ["## Adaptive solvers (NFE chosen by the error control)", "", "| solver | tolerance | NFE | RMSE |",
                "|---|---|---|---|"] + [f"| {r['solver']} | {r['spacing']} | {r['nfe']} | {r['rmse']:.2e} |"
                                        for r in adaptive] + [""]
    keys = list(dict.fromkeys((r["impl"], r["solver"], r["spacing"])
                              for r in rows if not r["spacing"].startswith("adaptive")))
    out += ["## All rows", ""] + _table(rows, keys, nfes, floor) + [""]
    return "\n".join(out)


def plot(doc: dict, path: Path, nfes=None) -> None:
    """Log-log RMSE vs NFE: left, the main fewstep solvers and every diffusers scheduler;
    right, every fewstep ODE solver at its best spacing. fewstep solid, diffusers dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    rows = doc["results"]
    keys = summary_keys(rows, floor_of(doc))
    fkeys = [k for k in keys if k[0] == "fewstep"]
    dkeys = [k for k in keys if k[0] == "diffusers"]
    main = list(dict.fromkeys(fkeys[:5] + [k for k in fkeys if k[1] in MAIN_PLOT_SOLVERS]))  # 5 best + references
    default = [k for k in dkeys if k[1:] == ("DPMSolverMultistepScheduler", "default")]
    fig, axes = plt.subplots(1, 2, figsize=(17, 7.5), sharey=True)
    dcolors = plt.cm.Dark2.colors + ("black", "dimgray")
    panels = (("fewstep (solid) vs diffusers (dashed)", main, dkeys, plt.cm.tab10.colors, dcolors),
              ("all fewstep ODE solvers at their best spacing", fkeys, default, plt.cm.tab20.colors, ("black",)))
    for ax, (title, fk, dk, fcolors, dcolors) in zip(axes, panels):
        for keys_, colors, style in ((fk, fcolors, ("-", "o")), (dk, dcolors, ("--", "s"))):
            for i, key in enumerate(keys_):
                pts = sorted((r["nfe"], r["rmse"]) for r in rows if (r["impl"], r["solver"], r["spacing"]) == key)
                ax.plot(*zip(*pts), ls=style[0], marker=style[1], ms=3.5, lw=1.5, color=colors[i % len(colors)],
                        label=f"{key[0]} {key[1]} [{key[2]}]")
        ax.set(xscale="log", yscale="log", xlabel="NFE (model calls)", title=title)
        ax.set_xticks(sorted(nfes or {r["nfe"] for r in rows}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    top = max(r["rmse"] for r in rows)
    if top > 1.0:  # diverged runs (RMSE > 1 on data in [-1, 1]) would squash the informative range
        axes[0].set_ylim(top=1.0)
    axes[0].set_ylabel("RMSE of x0 vs reference ODE solution" + (" (clipped at 1)" if top > 1.0 else ""))
    fig.suptitle(f"Solver error vs NFE on {doc['model'].get('name')} (w = {doc['model'].get('w')}, "
                 f"{doc['model'].get('samples')} samples)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
