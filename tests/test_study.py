"""The mini study v2: run naming, learning-rate selection with edge extension, the better-ECT choice,
the flattening criterion, the iterations-to-reach headline and the batch claim, from fake run
directories (the protocol itself runs for hours; its driver is exercised by the pure functions it uses)."""
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from ayt import study


def fake_run(ds_root, name, curve1, n=study.N_EVAL, swd=1.0):
    run = ds_root / name
    run.mkdir(parents=True)
    recs = [{"iteration": it, "sampler": s, "metric": "fd_eval", "n": n,
             "fd_eval": {"mean": v * (0.5 if s == "2step" else 1)}, "precision": {"mean": 0.5},
             "recall": {"mean": 0.4}, "swd": {"mean": swd}}
            for it, v in curve1.items() for s in ("1step", "2step")]
    (run / "results.json").write_text(json.dumps({"train": {"wall_clock_s_last_session": 10.0}, "eval": recs}))
    return run


def test_run_names_round_trip():
    for arm in study.ARMS:
        for control in (False, True):
            name = study.run_name(arm, 2e-4, 64, 100, control)
            assert study.parse_run_name(name) == {"arm": arm, "lr": 2e-4, "batch": 64, "seed": 100, "control": control}
    assert study.parse_run_name("mini-diffusion") is None and study.parse_run_name("evaluator.pt") is None


def test_pick_lr_reports_edges():
    assert study.pick_lr({1e-4: 3.0, 2e-4: 2.0, 5e-4: 4.0}) == (2e-4, None)
    assert study.pick_lr({1e-4: 1.0, 2e-4: 2.0, 5e-4: 4.0}) == (1e-4, "lower")
    assert study.pick_lr({1e-4: 5.0, 2e-4: 2.0, 5e-4: 1.0}) == (5e-4, "upper")


def test_iterations_to_reach_interpolates():
    curve = {250: 20.0, 500: 10.0, 1000: 5.0}
    assert study.iterations_to_reach(curve, 15.0) == pytest.approx(375.0)
    assert study.iterations_to_reach(curve, 25.0) == 250.0
    assert study.iterations_to_reach(curve, 1.0) is None


def _populate(ds_root, ect_official_better=True):
    ect = {250: 20.0, 500: 16.0, 1000: 12.0, 1500: 10.0, 2000: 9.5}
    ayt = {250: 18.0, 500: 12.0, 1000: 8.0, 1500: 6.0, 2000: 4.0}
    off = 0.0 if ect_official_better else 2.0
    for lr, d in ((1e-4, 1.0), (2e-4, 0.0), (5e-4, 3.0)):
        fake_run(ds_root, study.run_name("ect-fine", lr, 16, study.SELECTION_SEED), {k: v + d + 1 for k, v in ect.items()})
        fake_run(ds_root, study.run_name("ect-official", lr, 16, study.SELECTION_SEED), {k: v + d + off for k, v in ect.items()})
        fake_run(ds_root, study.run_name("ayt", lr, 16, study.SELECTION_SEED), {k: v + d for k, v in ayt.items()})
    best_ect = "ect-official" if ect_official_better else "ect-fine"
    for seed in study.SEEDS:
        fake_run(ds_root, study.run_name(best_ect, 2e-4, 16, seed), ect)
        fake_run(ds_root, study.run_name("ayt", 2e-4, 16, seed), ayt)
        fake_run(ds_root, study.run_name("ayt", 2e-4, 16, seed, control=True), {k: v + 5 for k, v in ect.items()})
        fake_run(ds_root, study.run_name(best_ect, 2e-4, 64, seed), {250: 15.0, 500: 12.0, 1000: 10.0})
    return best_ect


@pytest.mark.parametrize("official_better", [True, False])
def test_summarize_dataset(tmp_path, official_better):
    best = _populate(tmp_path / "shapes", official_better)
    s = study.summarize(tmp_path, ("shapes", "photos"))
    assert set(s["datasets"]) == {"shapes"}  # photos has no directory: left out, not invented
    d = s["datasets"]["shapes"]
    assert {a: v["pick"] for a, v in d["selection"].items()} == {a: 2e-4 for a in study.ARMS}
    assert all(v["edge"] is None for v in d["selection"].values())
    assert d["better_ect"] == best
    assert d["groups"]["ayt"]["fd_eval_1step"]["mean"] == 4.0 and d["groups"]["ayt"]["fd_eval_1step"]["seeds"] == 3
    assert d["groups"]["ect"]["fd_eval_2step"]["mean"] == pytest.approx(4.75)
    assert d["groups"]["control"]["fd_eval_1step"]["mean"] == pytest.approx(14.5)
    assert d["groups"]["ect_bs64"]["fd_eval_1step"]["mean"] == 10.0  # at BIG_BATCH_ITERS
    # the figures' curves as numbers: every evaluated iteration, over the seeds
    assert {i: c["mean"] for i, c in d["groups"]["ect"]["curve_1step"].items()} == {
        "250": 20.0, "500": 16.0, "1000": 12.0, "1500": 10.0, "2000": 9.5}
    assert d["groups"]["ect_bs64"]["curve_1step"]["500"] == {"mean": 12.0, "min": 12.0, "max": 12.0, "seeds": 3,
                                                             "values": [12.0] * 3}
    # ECT changes 10.0 -> 9.5 from 1500 to 2000: 5% < 10%, flattened
    assert d["ect_flattening"]["relative_change"] == pytest.approx(0.05) and d["ect_flattening"]["flattened"]
    # AYT reaches ECT's final 9.5 between 500 (12) and 1000 (8): 500 + 500 * 2.5/4 = 812.5
    assert [x["ayt_iterations_to_reach"] for x in d["headline"]["per_seed"]] == [pytest.approx(812.5)] * 3
    assert d["headline"]["speedup"]["mean"] == pytest.approx(2000 / 812.5)
    assert d["batch_claim"]["ayt_bs16"]["mean"] == 8.0 and d["batch_claim"]["ect_bs64"]["mean"] == 10.0
    assert d["complete"]
    assert d["feature_nets"] == {}  # fake runs have no shared pieces
    (tmp_path / "shapes" / "mini-dae").mkdir()
    (tmp_path / "shapes" / "mini-dae" / "results.json").write_text(json.dumps({"feature_net": {"rmse": {"1": 0.2}}}))
    assert study.summarize_dataset(tmp_path / "shapes")["feature_nets"] == {"mini-dae": {"rmse": {"1": 0.2}}}


def _lengthen(run, tail):
    """Add evaluations past ITERS to a fake run, as continuing it to a longer horizon does."""
    res = run / "results.json"
    d = json.loads(res.read_text())
    d["eval"] += json.loads((fake_run(run.parent / "tmp", "x", tail) / "results.json").read_text())["eval"]
    shutil.rmtree(run.parent / "tmp")
    d["train"]["iterations"] = max(tail)
    res.write_text(json.dumps(d))


def test_summary_moves_to_the_longer_horizon_once_every_pair_run_has_it(tmp_path):
    root = tmp_path / "shapes"
    best = _populate(root)
    for seed in study.SEEDS:  # ECT still falls 20% from 1500 to 2000, then 5% from 3000 to 4000
        shutil.rmtree(root / study.run_name(best, 2e-4, 16, seed))
        fake_run(root, study.run_name(best, 2e-4, 16, seed), {250: 20.0, 500: 16.0, 1000: 12.0, 1500: 10.0, 2000: 8.0})
    d = study.summarize_dataset(root)
    assert d["horizon"] == 2000 and not d["ect_flattening"]["flattened"] and not d["complete"]
    assert "headline_by_horizon" not in d and "long" not in d
    for seed in study.SEEDS:
        _lengthen(root / study.run_name(best, 2e-4, 16, seed), {3000: 6.0, 4000: 5.7})
        _lengthen(root / study.run_name("ayt", 2e-4, 16, seed), {3000: 3.5, 4000: 3.4})
        if seed < 2:  # a horizon counts only when every seed's pair has reached it
            assert study.summarize_dataset(root)["horizon"] == 2000
    d = study.summarize_dataset(root)
    assert d["horizon"] == 4000 and d["complete"]
    assert d["ect_flattening"] == {"from": 3000, "to": 4000, "seeds": 3, "relative_change": pytest.approx(0.05),
                                   "tolerance": study.FLAT_TOL, "flattened": True}
    # AYT reaches ECT's 5.7 between 1500 (6) and 2000 (4): 1575; ECT's 8 at 2000 it reached at 1000
    assert d["headline"]["horizon"] == 4000 and d["headline"]["speedup"]["mean"] == pytest.approx(4000 / 1575)
    assert d["headline_by_horizon"]["2000"]["speedup"]["mean"] == pytest.approx(2.0)
    assert d["long"]["ayt"]["fd_eval_1step"]["mean"] == pytest.approx(3.4) and d["long"]["ect"]["iteration"] == 4000
    assert d["groups"]["ayt"]["iteration"] == 2000 and d["groups"]["control"]["iteration"] == 2000
    md = study.report_markdown(study.summarize(tmp_path, ("shapes",)))
    assert "after 1575 (1575-1575) iterations, 2.54 (2.54-2.54)x fewer than 4000." in md
    assert "- at the shorter horizon 2000: AYT reaches the final 1-step FD_eval of better ECT (8.00" in md
    assert "changes by 5.0% from iteration 3000 to 4000: flattened" in md
    assert "| AYT | 3 | 4000 | 3.40 (3.40-3.40) |" in md and "| AYT | 3 | 2000 | 4.00 (4.00-4.00) |" in md


@pytest.mark.parametrize("flat", [True, False])
def test_driver_continues_ayt_and_ect_while_ect_has_not_flattened(tmp_path, monkeypatch, flat):
    root = tmp_path / "shapes"
    best = _populate(root)  # ECT changes 5% from 1500 to 2000: flattened
    if not flat:
        for seed in study.SEEDS:
            shutil.rmtree(root / study.run_name(best, 2e-4, 16, seed))
            fake_run(root, study.run_name(best, 2e-4, 16, seed), {1500: 10.0, 2000: 8.0})
    calls, said = [], []

    def fake_ct_run(self, ds, arm, lr, seed, batch=16, control=False, iters=None):
        calls.append((arm, seed, batch, control, iters))
        return root / study.run_name(arm, lr, batch, seed, control)
    monkeypatch.setattr(study.Study, "shared", lambda self, ds: None)
    monkeypatch.setattr(study.Study, "select", lambda self, ds, arm: 2e-4)
    monkeypatch.setattr(study.Study, "ct_run", fake_ct_run)
    study.Study(tmp_path, workers=2, log=said.append).dataset("shapes")
    longer = sorted(c for c in calls if c[-1] is not None)
    assert longer == ([] if flat else sorted((a, s, 16, False, 4000) for s in study.SEEDS for a in ("ayt", best)))
    assert len(calls) == 12 + len(longer)  # pairs, control, batch 64, and the continued pairs
    assert any("still changes by 20.0% from 1500 to 2000: continuing AYT and ECT to 4000" in m for m in said) != flat


def test_headline_is_absent_when_ayt_never_reaches_ect(tmp_path):
    root = tmp_path / "photos"
    for arm in study.ARMS:
        fake_run(root, study.run_name(arm, 1e-4, 16, study.SELECTION_SEED), {2000: 5.0 if arm != "ayt" else 6.0})
    for seed in study.SEEDS:
        fake_run(root, study.run_name("ect-fine", 1e-4, 16, seed), {1500: 5.0, 2000: 4.0})
        fake_run(root, study.run_name("ayt", 1e-4, 16, seed), {1500: 6.0, 2000: 5.0})
    d = study.summarize(tmp_path)["datasets"]["photos"]
    assert d["selection"]["ayt"]["edge"] == "lower"  # a one-point grid is its own edge
    assert all(x["ayt_iterations_to_reach"] is None for x in d["headline"]["per_seed"])
    assert "speedup" not in d["headline"]  # never a number when a seed did not get there
    assert not d["ect_flattening"]["flattened"]  # 5 -> 4 is a 20% change
    assert not d["complete"]  # no control, no batch claim


def test_selection_extends_an_edge_pick(tmp_path, monkeypatch):
    """Study.select runs the grid, extends past an edge pick, and stops at an interior pick."""
    score = {1e-4: 3.0, 2e-4: 2.0, 5e-4: 1.5, 1.25e-3: 1.8}  # best at the upper edge, then interior
    calls = []

    def fake_ct_run(self, ds, arm, lr, seed, batch=16, control=False):
        calls.append(lr)
        return fake_run(tmp_path / ds, study.run_name(arm, lr, batch, seed), {study.ITERS: score[lr]})
    monkeypatch.setattr(study.Study, "ct_run", fake_ct_run)
    s = study.Study(tmp_path, workers=2, log=lambda m: None)
    assert s.select("shapes", "ayt") == 5e-4
    assert sorted(calls) == [1e-4, 2e-4, 5e-4, 1.25e-3]


def test_cli_rejects_unknown_dataset_and_missing_summary(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--run-root", str(tmp_path), "--datasets", "cifar10", "--summary-only"])
    with pytest.raises(SystemExit):
        study.main(["--report", str(tmp_path / "nope.json")])
    assert "no such summary file" in capsys.readouterr().err


def test_driver_prints_one_line_per_started_and_finished_job(tmp_path):
    lines = []
    s = study.Study(tmp_path, workers=1, log=lines.append)
    log = tmp_path / "logs" / "x.log"
    s._run([sys.executable, "-m", "ayt", "presets"], log, "shapes/x")
    assert lines[0].endswith(f"start  shapes/x  (log {log})")
    assert " done   shapes/x  in 0m" in lines[1] and lines[1].endswith(f"(log {log})")
    assert "mini-ayt" in log.read_text()  # the job's output went to its log
    with pytest.raises(RuntimeError, match="failed"):
        s._run([sys.executable, "-c", "raise SystemExit(3)"], log, "shapes/bad")
    assert "FAILED shapes/bad (exit 3)" in lines[-1]


def test_driver_says_what_its_running_jobs_are_doing(tmp_path):
    """The heartbeat: while a job runs, a line at least every `heartbeat` seconds with its log's last line."""
    lines = []
    s = study.Study(tmp_path, workers=1, log=lines.append, heartbeat=0.1)
    job = "import time; print('[x] 1/3 loss 2 | 4.0 it/s | eta 0m01s', flush=True); time.sleep(1.5)"
    s._run([sys.executable, "-c", job], tmp_path / "x.log", "shapes/x")
    beats = [ln for ln in lines if "running:" in ln]
    assert beats and beats[-1].endswith("running: shapes/x: 1/3 loss 2 | 4.0 it/s | eta 0m01s")
    time.sleep(0.3)
    assert not any("running:" in ln for ln in lines[len(lines) - 1:]) and lines[-1].split("] ", 1)[1].startswith("done")
    assert study.last_progress(tmp_path / "missing.log") == "starting"


def test_figure_runs_label_the_reporting_arms(tmp_path):
    root = tmp_path / "shapes"
    best = _populate(root, ect_official_better=True)
    for run in root.iterdir():
        m = study.parse_run_name(run.name)
        (run / "config.json").write_text(json.dumps({
            "stage": "consistency", "ct": {"mode": "ect" if m["arm"] != "ayt" else "mfd", "feature_net": None},
            "batch": m["batch"], "optim": {"lr": m["lr"]}, "seed": m["seed"], "iters": 2000,
            "data": {"name": "shapes", "resolution": 16}}))
    runs = study.figure_runs(root)
    labels = sorted({(r["method"], r["batch"]) for r in runs})
    assert labels == [("AYT", 16), ("AYT (untrained phi)", 16), ("ECT (official schedule)", 16),
                      ("ECT (official schedule)", 64)]
    assert all(r["seed"] in study.SEEDS for r in runs) and len(runs) == 12  # no selection-seed run
    assert best == "ect-official"
    assert study.chosen_runs(tmp_path / "nothing") == {}
    assert [r["method"] for r in study.figure_runs(root, family=True)] == ["AYT"] * 3  # no family run yet
    for seed in study.SEEDS:
        for arm in study.FAMILY_ARMS:
            run = fake_run(root, study.run_name(arm, 2e-4, 16, seed), {1000: 12.0, 2000: 9.0})
            (run / "config.json").write_text(json.dumps({
                "stage": "consistency", "ct": {"mode": "ect", "feature_net": None}, "batch": 16,
                "optim": {"lr": 2e-4}, "seed": seed, "iters": 2000, "data": {"name": "shapes", "resolution": 16}}))
    fam = study.figure_runs(root, family=True)
    assert sorted({r["method"] for r in fam}) == ["AYT", "AYT, autoencoder phi", "CCD", "CCD-AYT", "CT", "CT-AYT"]
    assert len(fam) == 18 and len(study.figure_runs(root)) == 12  # the main figure is unchanged


def test_family_runs_borrow_the_picks_and_pair_up(tmp_path):
    """The family arms (--family): names parse, each arm's lr is its discrete counterpart's pick, the
    pairs report the challenger's iterations to reach the baseline, and the main summary is unchanged."""
    root = tmp_path / "shapes"
    best = _populate(root)  # picks: every arm 2e-4
    main = study.summarize_dataset(root)
    assert "family" not in main  # no family run yet: no invented entry
    # make AYT's pick differ from ECT's: AYT's selection run at 5e-4 now scores best
    shutil.rmtree(root / study.run_name("ayt", 5e-4, 16, study.SELECTION_SEED))
    fake_run(root, study.run_name("ayt", 5e-4, 16, study.SELECTION_SEED), {study.ITERS: 1.0})
    lrs = study.family_lrs(study.selection(root))
    assert lrs == {"ccd": 2e-4, "ct": 2e-4, "ccd-ayt": 5e-4, "ct-ayt": 5e-4, "ayt-dae": 5e-4}
    for arm in study.FAMILY_ARMS:
        name = study.run_name(arm, lrs[arm], 16, 0)
        assert study.parse_run_name(name)["arm"] == arm
    base = {250: 20.0, 500: 16.0, 1000: 12.0, 1500: 10.0, 2000: 9.0}
    fast = {250: 18.0, 500: 9.0, 1000: 7.0, 1500: 6.0, 2000: 5.0}
    for seed in study.SEEDS:
        fake_run(root, study.run_name("ccd", 2e-4, 16, seed), base)
        fake_run(root, study.run_name("ccd-ayt", 5e-4, 16, seed), fast)
        fake_run(root, study.run_name("ct", 2e-4, 16, seed), fast)
        fake_run(root, study.run_name("ct-ayt", 5e-4, 16, seed), base)  # never reaches ct's final 5.0
        fake_run(root, study.run_name("ayt", 5e-4, 16, seed), base)
        if seed != 2:
            fake_run(root, study.run_name("ayt-dae", 5e-4, 16, seed), fast)
    fam = study.summarize_dataset(root)["family"]
    assert fam["lr"] == lrs and fam["groups"]["ccd"]["fd_eval_1step"]["mean"] == 9.0
    assert fam["groups"]["ayt-dae"]["curve_1step"]["250"]["seeds"] == 2  # seed 2 has no ayt-dae run
    ccd = fam["pairs"]["ccd_vs_ccd-ayt"]
    # ccd-ayt reaches 9.0 between 250 (18) and 500 (9): exactly at 500
    assert [s["ccd-ayt_iterations_to_reach"] for s in ccd["per_seed"]] == [500.0] * 3
    assert ccd["speedup"]["mean"] == pytest.approx(4.0)
    ct = fam["pairs"]["ct_vs_ct-ayt"]
    assert all(s["ct-ayt_iterations_to_reach"] is None for s in ct["per_seed"]) and "speedup" not in ct
    dae = fam["pairs"]["ayt_vs_ayt-dae"]
    assert [s["seed"] for s in dae["per_seed"]] == [0, 1]  # seed 2 has no ayt-dae run
    assert not fam["complete"]
    fake_run(root, study.run_name("ayt-dae", 5e-4, 16, 2), fast)
    assert study.summarize_dataset(root)["family"]["complete"]
    assert best in study.ECT_ARMS


def test_family_driver_runs_every_arm_and_seed_after_the_selection(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    _populate(root)
    calls, trained = [], []
    monkeypatch.setattr(study.Study, "train", lambda self, ds, preset, name, over: trained.append(preset))
    monkeypatch.setattr(study.Study, "ct_run", lambda self, ds, arm, lr, seed, batch=16, control=False:
                        calls.append((arm, lr, seed, batch, control)))
    study.Study(tmp_path, workers=2, log=lambda m: None).family("shapes")
    assert trained == ["mini-dae"]
    assert sorted(calls) == sorted((a, 2e-4, s, 16, False) for a in study.FAMILY_ARMS for s in study.SEEDS)
    with pytest.raises(KeyError, match="main protocol first"):
        study.Study(tmp_path, workers=1, log=lambda m: None).family("photos")


def test_a_run_on_one_dataset_keeps_the_others_in_the_summary(tmp_path, monkeypatch):
    _populate(tmp_path / "shapes")
    _populate(tmp_path / "photos")
    monkeypatch.setattr(study.Study, "dataset", lambda self, ds: None)
    monkeypatch.setattr(study.Study, "family", lambda self, ds: None)
    summary = study.Study(tmp_path, workers=1, log=lambda m: None).run(["shapes"], family=True)
    assert sorted(summary["datasets"]) == ["photos", "shapes"]
    on_disk = json.loads((tmp_path / "mini-study.json").read_text())
    assert on_disk["datasets"]["photos"] == summary["datasets"]["photos"]
    (tmp_path / "mini-study.json").unlink()
    assert study.main(["--run-root", str(tmp_path), "--datasets", "shapes", "--summary-only"]) == 0
    assert sorted(json.loads((tmp_path / "mini-study.json").read_text())["datasets"]) == ["photos", "shapes"]


def test_study_time_benchmark_reads_runs_and_driver_logs(tmp_path):
    """benchmarks/study_time.py: per-run training/evaluation seconds from results.json, resumed runs
    flagged, and each driver invocation's span and finished jobs from its "done" lines."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import study_time
    root = tmp_path / "shapes"
    fake_run(root, study.run_name("ayt", 2e-4, 16, 0), {1000: 5.0, 2000: 4.0})
    res = root / study.run_name("ayt", 2e-4, 16, 0) / "results.json"
    d = json.loads(res.read_text())
    d["train"]["started_at_iteration"] = 750
    for r in d["eval"]:
        r["seconds"] = 2.5
    res.write_text(json.dumps(d))
    fake_run(root, "mini-diffusion", {})
    longer = fake_run(root, study.run_name("ect-official", 2e-4, 16, 0), {2000: 5.0})  # continued to 4000
    d = json.loads((longer / "results.json").read_text())
    d["train"] = {"iterations": 4000, "sessions": [{"from": 0, "to": 2000, "wall_clock_s": 600.0},
                                                   {"from": 2000, "to": 4000, "wall_clock_s": 700.0}]}
    (longer / "results.json").write_text(json.dumps(d))
    assert study_time.run_times(longer)["train_s"] == 1300.0 and study_time.run_times(longer)["resumed_from"] == 0
    shutil.rmtree(longer)
    t = study_time.dataset_times(root)
    assert set(t["shared"]) == {"mini-diffusion"} and len(t["runs"]) == 1
    assert t["totals"] == {"jobs": 2, "train_s": 20.0, "eval_s": 10.0, "single_core_hours": round(30 / 3600, 2),
                           "resumed_runs": [study.run_name("ayt", 2e-4, 16, 0)]}
    log = tmp_path / "driver.log"
    log.write_text("[study 0m00s] start  shapes/a  (log x)\n[study 1h02m03s] done   shapes/a  in 1h01m00s  (log x)\n"
                   "[study 1h05m00s] done   shapes/a evaluation  in 0m59s  (log x)\n"
                   "[study 2h10m] done   shapes/b  in 1h04m  (log x)\n")  # fmt_time's form above an hour
    assert study_time.driver_times(log) == {"log": str(log), "span_s": 7800, "jobs_done": 3,
                                            "jobs": {"shapes/a": 3660, "shapes/a evaluation": 59, "shapes/b": 3840}}
    assert study_time.main(["--run-root", str(tmp_path), "--driver-log", str(log), "--out", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["datasets"]["shapes"]["totals"]["jobs"] == 2


def test_report_renders_every_headline_number(tmp_path):
    root = tmp_path / "shapes"
    _populate(root)
    for seed in study.SEEDS:
        for arm in study.FAMILY_ARMS:
            fake_run(root, study.run_name(arm, 2e-4, 16, seed), {1000: 12.0, 2000: 9.0})
    md = study.report_markdown(study.summarize(tmp_path, ("shapes",)))
    assert md.startswith("**shapes**\n")  # complete: no "incomplete" mark
    assert "- selection, AYT: 0.0001: 5.00, 0.0002: 4.00, 0.0005: 7.00; pick 0.0002\n" in md
    assert "AYT reaches the final 1-step FD_eval of better ECT (9.50 (9.50-9.50)) after 812 (812-812) iterations" in md
    assert "changes by 5.0% from iteration 1500 to 2000: flattened" in md
    assert "AYT at batch 16 8.00 (8.00-8.00), better ECT at batch 64 10.00 (10.00-10.00)" in md
    assert "| AYT | 3 | 2000 | 4.00 (4.00-4.00) | 2.00 (2.00-2.00) | 1.0 (1.0-1.0) | 0.50 (0.50-0.50) |" in md
    assert "| better ECT, batch 64 | 3 | 1000 | 10.00 (10.00-10.00) |" in md
    # family: ccd-ayt equals ccd (9.0 at 2000): reached at 2000 exactly, speed-up 1; ayt-dae never reaches AYT's 4.0
    assert "- ccd vs ccd-ayt: CCD-AYT reaches the final 1-step FD_eval of CCD (9.00 (9.00-9.00)) after 2000" in md
    assert "- ayt vs ayt-dae: AYT, autoencoder phi reaches the final 1-step FD_eval of AYT on 0 of 3 seeds" in md
    assert "| CT-AYT | 3 | 2000 | 9.00 (9.00-9.00) |" in md


def test_readme_study_numbers_are_the_committed_summary():
    """The README's study block is `python -m ayt study --report figures/mini-study.json`, verbatim."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    start, end = "<!-- study-report: python -m ayt study --report figures/mini-study.json -->\n", "<!-- /study-report -->"
    assert start in readme and end in readme
    block = readme.split(start, 1)[1].split(end, 1)[0]
    summary = json.loads((repo / "figures" / "mini-study.json").read_text())
    assert block == study.report_markdown(summary)


def fake_diverged_run(ds_root, name, iteration=812):
    run = ds_root / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"diverged": {"iteration": iteration, "message": "non-finite loss"}}))
    return run


def test_a_diverged_run_is_a_result_not_a_crash(tmp_path, monkeypatch):
    """A run stopped by a non-finite loss (results.json "diverged") scores +inf in the selection, is named in
    the summary and the report, counts as done for the family, and the driver neither fails nor retries it."""
    root = tmp_path / "shapes"
    _populate(root)
    shutil.rmtree(root / study.run_name("ayt", 5e-4, 16, study.SELECTION_SEED))
    fake_diverged_run(root, study.run_name("ayt", 5e-4, 16, study.SELECTION_SEED))
    sel = study.selection(root)["ayt"]
    assert sel["scores"]["0.0005"] is None and sel["pick"] == 2e-4 and sel["edge"] is None  # bracketed by it
    assert study.pick_lr({1e-4: float("inf"), 2e-4: float("inf")}) == (1e-4, "lower")  # all diverged: go down
    d = study.summarize_dataset(root)
    assert d["diverged"] == {study.run_name("ayt", 5e-4, 16, study.SELECTION_SEED): 812} and d["complete"]
    md = study.report_markdown({"datasets": {"shapes": d}})
    assert "0.0002: 4.00, 0.0005: diverged; pick 0.0002" in md
    assert "- diverged (non-finite loss; not retried, left out of the means): ayt-lr0.0005-bs16-s100 at iteration 812" in md
    # family: a diverged seed is done (the arm is complete), and the pair uses the seeds that finished
    for seed in study.SEEDS:
        for arm in study.FAMILY_ARMS:
            name = study.run_name(arm, 2e-4, 16, seed)
            fake_diverged_run(root, name, 300) if (arm, seed) == ("ct-ayt", 1) else fake_run(root, name, {2000: 9.0})
    fam = study.summarize_dataset(root)["family"]
    assert fam["complete"] and [s["seed"] for s in fam["pairs"]["ct_vs_ct-ayt"]["per_seed"]] == [0, 2]
    assert fam["groups"]["ct-ayt"]["fd_eval_1step"]["seeds"] == 2
    # the driver: a run that diverges is reported and returned; next time it is skipped; other failures raise
    said, ran = [], []

    def fake_run_job(self, cmd, log, what):
        ran.append(what)
        if "boom" not in what:
            fake_diverged_run(tmp_path / "photos", what.split("/")[1], 40)
        raise RuntimeError(f"{what} failed (exit 1)")
    monkeypatch.setattr(study.Study, "_run", fake_run_job)
    s = study.Study(tmp_path, workers=1, log=said.append)
    run = s.train("photos", "mini-ayt", "ayt-lr0.01-bs16-s100", [], 2000)
    assert study.diverged_at(run) == 40 and "diverged at iteration 40 (non-finite loss): a result, not retried" in said[-1]
    assert study.final_score(run) == float("inf")
    s.train("photos", "mini-ayt", "ayt-lr0.01-bs16-s100", [], 2000)
    assert ran == ["photos/ayt-lr0.01-bs16-s100"] and "skip   photos/ayt-lr0.01-bs16-s100" in said[-1]
    with pytest.raises(RuntimeError, match="boom"):
        s.train("photos", "mini-ayt", "boom", [], 2000)


def test_teacher_is_scored_once_for_reference(tmp_path, monkeypatch):
    """Step 0 scores the teacher with EDM's Heun sampler and the study's evaluator; the summary and the report
    give its numbers as a reference line."""
    root = tmp_path / "shapes"
    _populate(root)
    teacher = root / "mini-diffusion"
    teacher.mkdir()
    (teacher / "results.json").write_text(json.dumps({"train": {"iterations": 3000}}))
    cmds = []

    def fake_eval(self, cmd, log, what):
        cmds.append(cmd)
        recs = [{"iteration": 3000, "sampler": study.TEACHER_SAMPLER, "metric": "fd_eval", "n": study.N_EVAL,
                 "fd_eval": {"mean": 3.25}, "precision": {"mean": 0.7}, "recall": {"mean": 0.6}, "swd": {"mean": 40.0}}]
        (teacher / "results.json").write_text(json.dumps({"train": {"iterations": 3000}, "eval": recs}))
    monkeypatch.setattr(study.Study, "_run", fake_eval)
    assert "teacher" not in study.summarize_dataset(root)
    s = study.Study(tmp_path, workers=1, log=lambda m: None)
    s.evaluate_teacher("shapes")
    s.evaluate_teacher("shapes")  # done: not run again
    assert len(cmds) == 1 and cmds[0][cmds[0].index("--checkpoints") + 1] == "3000" and str(teacher) in cmds[0]
    d = study.summarize_dataset(root)
    assert d["teacher"]["iteration"] == 3000 and d["teacher"]["fd_eval_heun18"]["mean"] == 3.25
    md = study.report_markdown({"datasets": {"shapes": d}})
    assert ("- teacher `mini-diffusion` (EDM Heun sampler, 18 steps = 35 network evaluations), for reference: "
            "FD_eval 3.25, SWD 40.0, precision 0.70, recall 0.60\n") in md
