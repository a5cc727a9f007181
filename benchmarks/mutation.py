"""Mutation testing: how many small, plausible bugs does the suite catch?

    python benchmarks/mutation.py [--suite solvers|distill] [--sample N] [--seed S] [--shard I/N]
                                  [--timeout SECONDS] [--out STEM]
    python benchmarks/mutation.py --rerun benchmarks/results/mutation.json --out mutation_rerun

Run it in a copy of the tree (it edits files): cp -r . /tmp/mut && cd /tmp/mut && python benchmarks/mutation.py

Suites: ``solvers`` (default) mutates fewstep/solvers/*.py, fewstep/schedules.py and fewstep/denoisers.py
and runs the solver-core tests; ``distill`` mutates fewstep/distill/*.py, fewstep/losses.py and
fewstep/train.py and runs tests/test_distill_*.py, tests/test_train.py and tests/test_distributed.py
(the loop's multi-process paths). ``--shard I/N`` runs every
N-th drawn mutant starting at I (0-based), so N copies of the tree can share one draw.

Mutants: one change per
mutant on a code line (not comments or docstrings): a float literal scaled by 1.1, an integer
literal +1, '+' <-> '-' and '*' <-> '/' between operands, '<' <-> '<=' and '>' <-> '>='. Each
mutant is applied to the working tree, the solver-core tests run (stopping at the first failure),
and the file is restored. Killed = some test failed; survived = all passed; timeout counts as
killed. Results: benchmarks/results/mutation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "solvers": (sorted((ROOT / "fewstep" / "solvers").glob("*.py")) + [ROOT / "fewstep" / "schedules.py",
                                                                     ROOT / "fewstep" / "denoisers.py"],
                ["tests/test_solvers.py", "tests/test_solver_singlestep.py", "tests/test_parity_diffusers.py",
                 "tests/test_solver_sde.py", "tests/test_schedules.py", "tests/test_denoisers.py",
                 "tests/test_testbed.py"]),
    "distill": (sorted((ROOT / "fewstep" / "distill").glob("*.py")) + [ROOT / "fewstep" / "losses.py",
                                                                     ROOT / "fewstep" / "train.py"],
                sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_distill_*.py"))
                + ["tests/test_train.py", "tests/test_distributed.py"]),
}
OUT = ROOT / "benchmarks" / "results"

RULES = [
    ("float x1.1", re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.])"), lambda m: repr(float(m.group(1)) * 1.1)),
    ("int +1", re.compile(r"(?<![\w.\[])([1-9])(?![\w.\]])"), lambda m: str(int(m.group(1)) + 1)),
    ("+ -> -", re.compile(r"(?<=[\w)\]]) \+ (?=[\w(])"), lambda m: " - "),
    ("- -> +", re.compile(r"(?<=[\w)\]]) - (?=[\w(])"), lambda m: " + "),
    ("* -> /", re.compile(r"(?<=[\w)\]]) \* (?=[\w(])"), lambda m: " / "),
    ("/ -> *", re.compile(r"(?<=[\w)\]]) / (?=[\w(])"), lambda m: " * "),
    ("< -> <=", re.compile(r" < "), lambda m: " <= "),
    ("> -> >=", re.compile(r" > "), lambda m: " >= "),
]


def code_lines(text: str):
    """Indices of lines that are code (skip blank, comments, docstrings, imports, raise/error text)."""
    in_doc = False
    for i, line in enumerate(text.splitlines()):
        s = line.strip()
        quotes = s.count('"""')
        if in_doc:
            in_doc = quotes % 2 == 0
            continue
        if s.startswith('"""'):
            in_doc = quotes == 1
            continue
        if not s or s.startswith(("#", "import", "from", "raise", "def ", "class ", "@")) or "Error(" in s:
            continue
        yield i


def mutants(targets):
    for path in targets:
        lines = path.read_text().splitlines()
        for i in code_lines(path.read_text()):
            code = lines[i].split("#")[0]
            if code.count('"') or code.count("'"):  # strings: messages, names
                continue
            for name, rx, repl in RULES:
                for m in rx.finditer(code):
                    if _same_value(m.group(0), repl(m)):  # 0.0 * 1.1: an equivalent mutant, not a test of anything
                        continue
                    yield {"file": str(path.relative_to(ROOT)), "line": i + 1, "rule": name,
                           "before": lines[i].strip(), "start": m.start(), "end": m.end(), "new": repl(m)}


def _same_value(before: str, after: str) -> bool:
    try:
        return float(before) == float(after)
    except ValueError:
        return False


def run_one(mut: dict, timeout: int, tests: list[str]) -> dict:
    path = ROOT / mut["file"]
    original = path.read_text()
    lines = original.splitlines(keepends=True)
    line = lines[mut["line"] - 1]
    lines[mut["line"] - 1] = line[:mut["start"]] + mut["new"] + line[mut["end"]:]
    path.write_text("".join(lines))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        status = "survived" if r.returncode == 0 else "killed"
        first = next((ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")), "")
    except subprocess.TimeoutExpired:
        status, first = "killed (timeout)", ""
    finally:
        path.write_text(original)
    return {**mut, "after": lines[mut["line"] - 1].strip(), "status": status, "seconds": round(time.time() - t0, 1),
            "killed_by": first}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="solvers", help="what to mutate and which tests judge")
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th drawn mutant from the I-th (0-based)")
    p.add_argument("--sample", type=int, default=40, help="mutants drawn at random (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--rerun", type=Path, default=None,
                   help="run again the survivors of an earlier mutation.json (after adding tests)")
    p.add_argument("--out", default="mutation", help="stem of the result files in benchmarks/results")
    args = p.parse_args(argv)
    targets, tests = SUITES[args.suite]
    shard, shards = (int(v) for v in args.shard.split("/"))
    every = list(mutants(targets))
    if args.rerun:
        old = [r for r in json.loads(args.rerun.read_text())["results"] if r["status"] == "survived"]
        keys = {(r["file"], r["line"], r["rule"], r["start"]) for r in old}
        chosen = [m for m in every if (m["file"], m["line"], m["rule"], m["start"]) in keys]
    else:
        chosen = every if args.sample == 0 else random.Random(args.seed).sample(every, min(args.sample, len(every)))
        chosen = chosen[shard::shards]
    results = []
    for k, mut in enumerate(chosen):
        results.append(run_one(mut, args.timeout, tests))
        r = results[-1]
        print(f"[{k + 1}/{len(chosen)}] {r['status']:9s} {r['file']}:{r['line']} {r['rule']}: {r['after']}", flush=True)
    killed = sum(r["status"].startswith("killed") for r in results)
    doc = {"total_mutants": len(every), "run": len(results), "killed": killed,
           "kill_rate": killed / max(1, len(results)), "seed": args.seed, "suite": args.suite, "shard": args.shard, "results": results,
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"# Mutation run ({doc['date']}): {killed} of {len(results)} killed "
          f"({100 * doc['kill_rate']:.0f}%), drawn from {len(every)} mutants", "",
          "| status | where | rule | mutated line |", "|---|---|---|---|"]
    md += [f"| {r['status']} | {r['file']}:{r['line']} | {r['rule']} | `{r['after']}` |" for r in results]
    (OUT / f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
