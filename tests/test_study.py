"""The mini-study summary: chosen learning rates, seed groups and the iterations-to-reach headline."""
import json
import sys

import pytest

from ayt import study


def fake_run(root, name, curve1, n=study.N_EVAL):
    run = root / name
    run.mkdir(parents=True)
    recs = [{"iteration": it, "sampler": s, "metric": "fd_eval", "n": n, "fd_eval": {"mean": v * (0.5 if s == "2step" else 1)}}
            for it, v in curve1.items() for s in ("1step", "2step")]
    (run / "results.json").write_text(json.dumps({"train": {}, "eval": recs}))


def test_iterations_to_reach_interpolates():
    curve = {250: 20.0, 500: 10.0, 1000: 5.0}
    assert study.iterations_to_reach(curve, 15.0) == pytest.approx(375.0)
    assert study.iterations_to_reach(curve, 25.0) == 250.0
    assert study.iterations_to_reach(curve, 1.0) is None


def test_summarize(tmp_path):
    ect = {250: 20.0, 500: 16.0, 1000: 12.0, 1500: 10.0, 2000: 8.0}
    ayt = {250: 18.0, 500: 12.0, 1000: 8.0, 1500: 6.0, 2000: 4.0}
    for seed in range(3):
        fake_run(tmp_path, f"mini-ect-lr0.0001-bs16-s{seed}", ect)
        fake_run(tmp_path, f"mini-ayt-lr0.0005-bs16-s{seed}", ayt)
    fake_run(tmp_path, "mini-ect-lr0.0005-bs16-s0", {k: v + 1 for k, v in ect.items()})
    fake_run(tmp_path, "mini-ayt-lr0.0001-bs16-s0", {k: v + 1 for k, v in ayt.items()})
    fake_run(tmp_path, "mini-ayt-lr0.0005-bs16-s0-randfeat", ect)
    s = study.summarize(tmp_path)
    assert s["chosen"] == {"ayt": "mini-ayt-lr0.0005-bs16-s0", "ect": "mini-ect-lr0.0001-bs16-s0"}
    g = s["groups"]["ayt-bs16-lr0.0005-1step"]
    assert g["seeds"] == 3 and g["mean"] == 4.0
    assert len(s["speedup"]) == 3 and all(x["ayt_iters_to_reach"] == 1000.0 and x["speedup"] == 2.0
                                          for x in s["speedup"])


def test_summarize_reports_the_control(tmp_path):
    fake_run(tmp_path, "mini-ayt-lr0.0005-bs16-s0-randfeat", {2000: 9.0})
    fake_run(tmp_path, "mini-ayt-lr0.0005-bs16-s0", {2000: 4.0})
    g = study.summarize(tmp_path)["groups"]
    assert g["ayt-randfeat-bs16-lr0.0005-1step"]["mean"] == 9.0 and g["ayt-bs16-lr0.0005-1step"]["mean"] == 4.0


def test_driver_prints_one_line_per_started_and_finished_job(tmp_path, capsys):
    log = tmp_path / "logs" / "mini-x.log"
    study._run([sys.executable, "-m", "ayt", "presets"], log)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"[study] started  presets mini-x (log {log})"
    assert lines[1].startswith("[study] finished presets mini-x in 0m") and lines[1].endswith(f"(log {log})")
    assert "mini-ayt" in log.read_text()  # the job's output went to its log
