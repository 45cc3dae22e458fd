"""`python -m ayt demo`, the main job, on tiny settings: four stages from one teacher, the feature net's
verdict, and the closing side-by-side scores with the sample grids' location."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end_prints_both_scores(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "AYT_PROGRESS": "plain"}
    cmd = [sys.executable, "-m", "ayt", "demo", "--run-root", str(tmp_path / "runs"), "--eval-samples", "32",
           "iters=4", "data.num_images=128", "batch=8", "feature.eval_images=32", "log_every=2", "ckpt_every=2",
           "sample_every=4", "snapshot_every=0", "log.tensorboard=false"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for run in ("demo-feature-net", "demo-diffusion", "demo-ect", "demo-ayt"):
        assert (tmp_path / "runs" / run / "results.json").exists(), run
    # 4 iterations cannot teach the feature net: the demo says so loudly, on stderr
    assert "WARNING: feature net" in out.stderr and "did NOT learn" in out.stderr
    lines = [l for l in out.stdout.splitlines() if l.strip().startswith(("demo-ect", "demo-ayt"))]
    assert len(lines) == 2 and all("SWD 1-step" in l and "2-step" in l and "samples:" in l for l in lines), out.stdout
    assert str(tmp_path / "runs" / "demo-ayt" / "samples") in lines[1]
    assert any((tmp_path / "runs" / "demo-ayt" / "samples").glob("*.png"))
    # the ECT and AYT stages started from the same teacher
    import json
    for run in ("demo-ect", "demo-ayt"):
        cfg = json.loads((tmp_path / "runs" / run / "config.json").read_text())
        assert Path(cfg["net"]["init"]) == tmp_path / "runs" / "demo-diffusion"
