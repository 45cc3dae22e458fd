"""benchmarks/gpu_check.py on the CPU (--cpu-smoke, tiny sizes): every section runs and reports, a
failing section is recorded while the others still run, a section past its budget is killed or
skipped, and the script runs twice in a row in the same place."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def run(tmp_path, *args, monkeypatch=None):
    report = gpu_check.main(["--cpu-smoke", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "out"),
                             *args])
    files = list((tmp_path / "out").glob("gpu_check-*-cpu-smoke.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["sections"].keys() == report["sections"].keys()
    assert (tmp_path / "results" / files[0].name).exists()
    return report


def test_smoke_sections_and_budgets(tmp_path, monkeypatch):
    # steps: the first variant runs, its budget is then spent and the other variants are skipped (each timing
    # is made to take at least 0.3 s, so the first variant's two timings outlast the 0.5 s on any machine)
    timed = gpu_check.StepBench.time
    monkeypatch.setattr(gpu_check.StepBench, "time", lambda self, *a, **k: (time.sleep(0.3), timed(self, *a, **k))[1])
    report = run(tmp_path, "--only", "env,steps,parity,sampling", "--budget", "steps=0.5")
    sec = report["sections"]
    assert [sec[k]["status"] for k in ("env", "steps", "parity", "sampling")] == ["ok"] * 4
    assert report["torch"] and sec["env"]["result"]["device"] == "cpu"
    variants = sec["steps"]["result"]["variants"]
    first = variants["fp32"]
    assert first["ECT"]["ms_per_step"] > 0 and first["AYT"]["ms_per_step"] > 0 and first["mfd_overhead"] > 0
    assert all(v == {"skipped": "section time budget spent"} for k, v in variants.items() if k != "fp32")
    assert sec["sampling"]["result"]["1step_b4"]["samples_per_s"] > 0
    assert "AYT/ECT" in "\n".join(gpu_check.summary_lines(report))


def test_failure_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("AYT_GPU_CHECK_FAIL", "env")
    report = run(tmp_path, "--only", "env,parity")
    assert report["sections"]["env"]["status"] == "error"
    assert "injected failure" in report["sections"]["env"]["error"]
    assert report["sections"]["parity"]["status"] == "ok"


def test_child_section_killed_at_its_budget_and_total_budget(tmp_path):
    report = run(tmp_path, "--only", "compile,env", "--budget", "compile=2")
    assert report["sections"]["compile"]["status"] == "timeout"
    assert report["sections"]["env"]["status"] == "ok"
    report = run(tmp_path, "--only", "env", "--total-budget", "0")
    assert report["sections"]["env"]["status"] == "skipped"


@pytest.mark.slow
def test_full_smoke_twice_in_a_row(tmp_path):
    """The shell entry point, every section, twice with the same output directory."""
    for run_index in range(2):  # the second run skips the (slow on a CPU) compile section
        p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--results-dir",
                            str(tmp_path / "results"), "--out", str(tmp_path / "out"), "--budget", "compile=900",
                            "--budget", "ddp=300", "--budget", "fid=300", "--budget", "tests=300",
                            "--total-budget", "2400"] + (["--skip", "compile"] if run_index else []),
                           capture_output=True, text=True, timeout=3000, env={**os.environ, "PY": sys.executable})
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        report = json.loads(next((tmp_path / "out").glob("gpu_check-*.json")).read_text())
        statuses = {k: v["status"] for k, v in report["sections"].items()}
        expected = [k for k in gpu_check.SECTIONS if not (run_index and k == "compile")]
        assert statuses == {k: "ok" for k in expected}, json.dumps(report, indent=1)[-4000:]
        if not run_index:
            compiled = report["sections"]["compile"]["result"]["variants"]["compiled+tf32"]
            assert compiled["ECT"]["ms_per_step"] > 0
    assert report["sections"]["ddp"]["result"]["iterations_logged"][-1] == 4
    assert report["sections"]["fid"]["result"]["fid_rel_diff"] < 1e-6
