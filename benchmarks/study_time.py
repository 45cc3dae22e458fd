"""How long the mini study takes: every job's measured time, from a study's run directories and driver logs.

The study (`python -m ayt study`, docs/mini-study.md) runs for hours and is resumable, so its cost is
measured where it is recorded rather than re-run here:
  * each run's `results.json`: the training wall clock of every session that finished it (`train.sessions`,
    e.g. 0 -> 2,000 and a continuation 2,000 -> 4,000; older files: `wall_clock_s_last_session`); a run whose
    first finishing session started past iteration 0 had an interrupted session that is not counted (it is
    flagged as resumed), and the seconds of each evaluation;
  * the driver's output (`--driver-log`, one per invocation): one "done <job> in <time>" line per finished
    job, and the span of the invocation.

Usage:
    python -m ayt study --run-root runs/study > runs/study/driver.log
    python benchmarks/study_time.py --run-root runs/study --driver-log runs/study/driver.log
Results are printed and written to benchmarks/results/study_time_cpu.json (`--out`). Record the load
of the machine while the study ran in `--note`: the times are wall clock, so sharing the cores with
other work inflates them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ayt import study  # noqa: E402
from ayt.train import finished_sessions  # noqa: E402

# ayt.progress.fmt_time writes '4m07s' below an hour and '2h05m' above (older drivers: '1h14m16s')
DONE = re.compile(r"^\[study (?:(\d+)h)?(\d+)m(?:(\d+)s)?\] done\s+(.+?)\s+in (?:(\d+)h)?(\d+)m(?:(\d+)s)?")


def _seconds(h, m, s) -> int:
    return int(h or 0) * 3600 + int(m) * 60 + int(s or 0)


def run_times(run: Path) -> dict | None:
    """Training and evaluation seconds of one run directory (None without results.json)."""
    res = run / "results.json"
    if not res.exists():
        return None
    d = json.loads(res.read_text())
    train = d.get("train", {})
    evals = d.get("eval", [])
    sessions = finished_sessions(train)
    train_s = round(sum(x["wall_clock_s"] or 0.0 for x in sessions), 1) if sessions else None
    # an unfinished session is missing: the first one started late, or one does not start where the last ended
    gap = (sessions[0]["from"] or next((b["from"] for a, b in zip(sessions, sessions[1:]) if b["from"] != a["to"]), 0)
           if sessions else 0)
    return {"train_s": train_s, "iterations": train.get("iterations"), "resumed_from": gap, "sessions": len(sessions),
            "eval_s": round(sum(float(r.get("seconds", 0.0)) for r in evals), 1), "evaluations": len(evals)}


def dataset_times(ds_root: Path) -> dict:
    shared, runs = {}, {}
    for p in sorted(ds_root.iterdir()):
        t = run_times(p) if p.is_dir() else None
        if t is None:
            continue
        (runs if study.parse_run_name(p.name) else shared)[p.name] = t
    done = [t for t in {**shared, **runs}.values() if t["train_s"] is not None]
    return {"shared": shared, "runs": runs,
            "totals": {"jobs": len(done), "train_s": round(sum(t["train_s"] for t in done), 1),
                       "eval_s": round(sum(t["eval_s"] for t in done), 1),
                       "single_core_hours": round(sum(t["train_s"] + t["eval_s"] for t in done) / 3600, 2),
                       "resumed_runs": sorted(n for n, t in {**shared, **runs}.items() if t["resumed_from"])}}


def driver_times(log: Path) -> dict:
    """Span of one driver invocation and its finished jobs, from its "done" lines."""
    jobs, span = {}, 0
    for line in log.read_text().splitlines():
        m = DONE.match(line)
        if m:
            span = max(span, _seconds(*m.group(1, 2, 3)))
            jobs[m.group(4)] = _seconds(*m.group(5, 6, 7))
    return {"log": str(log), "span_s": span, "jobs_done": len(jobs), "jobs": jobs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-root", required=True, help="the study's run root")
    p.add_argument("--driver-log", action="append", default=[], help="output of one `ayt study` invocation")
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/study_time_cpu.json)")
    args = p.parse_args(argv)
    root = Path(args.run_root)
    if not root.is_dir():
        p.error(f"--run-root {root} is not a directory")
    from fid_throughput import machine_info  # benchmarks/ is this script's directory
    out = {"machine": machine_info(torch.device("cpu")), "note": args.note,
           "datasets": {ds: dataset_times(root / ds) for ds in study.DATASETS if (root / ds).is_dir()},
           "drivers": [driver_times(Path(f)) for f in args.driver_log]}
    for ds, d in out["datasets"].items():
        t = d["totals"]
        print(f"{ds}: {t['jobs']} jobs, training {t['train_s'] / 3600:.2f} h, evaluation {t['eval_s'] / 3600:.2f} h "
              f"(single-core sum {t['single_core_hours']} h)")
    for d in out["drivers"]:
        print(f"driver {d['log']}: {d['jobs_done']} jobs done in {d['span_s'] / 3600:.2f} h")
    path = Path(args.out or Path(__file__).parent / "results" / "study_time_cpu.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
