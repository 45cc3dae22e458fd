"""The command line: defaults in every help text, presets, train --dry-run, eval's dFID flags and CPU
warning, and `python -m ayt plot`."""
import argparse
import json
import re

import pytest

from ayt import __main__ as cli
from ayt.config import PRESET_PURPOSES, PRESETS, TrainConfig, flatten, make_config
from ayt.data import make_shapes
from ayt.evaluate import EvalConfig
from ayt.metrics import train_evaluator
from ayt.train import train
from test_train import cfg_for


def _help(parser) -> str:
    return " ".join(parser.format_help().split())


def _subparsers(parser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _shown_default(action):
    d = action.default
    if d is None or d is argparse.SUPPRESS or d is False or d == []:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        return f"--{'' if d else 'no-'}{action.dest.replace('_', '-')}"
    return " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)


def test_every_flag_has_help_and_shows_its_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")
    subs = _subparsers(cli.build_parser())
    assert {"train", "sample", "eval", "plot", "demo", "presets"} <= set(subs)
    for name, parser in subs.items():
        if not parser.add_help:  # study, notebook: their own parsers, checked below
            continue
        text = _help(parser)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            shown = _shown_default(action)
            if shown is not None:
                assert f"(default: {shown})" in text, f"{name} {action.dest}: default {shown} not in help"
            elif action.option_strings and action.nargs != 0:  # None default: the help says what happens
                assert "default" in action.help, f"{name} {action.dest}: help does not say the default"
    assert "--n N number of samples in the grid (default: 64)" in _help(subs["sample"])
    assert "--n N samples per sampling run (default: 50000)" in _help(subs["eval"])
    assert "(default: --dfid)" in _help(subs["eval"]) and "(default: 0.2 0.4 0.8)" in _help(subs["eval"])
    assert "ct.q=256.0" in _help(subs["train"])  # every setting with its default
    for sub, wanted in (("study", ["--run-root RUN_ROOT", "(default: runs/study)", "(default: 2)", "(default: cpu)"]),
                        ("notebook", ["(default: runs/notebooks)", "(default: a UTC timestamp)"])):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for w in wanted:
            assert w in text, (sub, w)


def test_presets_list_and_resolved_settings(capsys):
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, p in PRESETS.items():
        (line,) = [l for l in lines if l.split()[:1] == [name]]
        assert line.split()[1] == p.get("stage", "consistency") and line.endswith(PRESET_PURPOSES[name])
    for name in ("mini-ayt", "cifar10-edm", "disk-ect"):
        assert cli.main(["presets", name]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"preset {name} (stage {make_config(name).stage}): ")
        settings = [l for l in out if re.match(r"^[* ] \S+=", l)]
        resolved, default = flatten(make_config(name)), flatten(TrainConfig())
        assert [l[2:].split("=")[0] for l in settings] == list(resolved)  # every setting, once, in order
        marked = {l[2:].split("=")[0] for l in settings if l.startswith("*")}
        assert marked == {k for k in resolved if resolved[k] != default[k]}
        assert marked >= {k for k, v in PRESETS[name].items() if default[k] != resolved[k]} | {"name"}
    assert "* batch=16  (default 128)" in cli_out(capsys, ["presets", "mini-ayt"])
    with pytest.raises(SystemExit):
        cli.main(["presets", "no-such-preset"])


def cli_out(capsys, argv):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def _tree(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A tiny consistency run with 2 checkpoints, evaluated through the CLI with --dfid-sigmas 0.4."""
    root = tmp_path_factory.mktemp("cli")
    run = train(cfg_for(root, "consistency"))
    images, params = make_shapes(256, 16, seed=1)
    ev = root / "ev.pt"
    train_evaluator(images, params, steps=5, batch_size=32, seed=0).save(ev)
    assert cli.main(["eval", str(run), "--checkpoints", "all", "--n", "16", "--runs", "1", "--batch", "16",
                     "--dfid-sigmas", "0.4", "--evaluator", str(ev), "--ref-images", "64", "--no-extras",
                     "--device", "cpu"]) == 0
    return run


def test_train_dry_run_creates_nothing(tmp_path, monkeypatch, capsys, evaluated_run):
    monkeypatch.chdir(tmp_path)
    out = cli_out(capsys, ["train", "--preset", "mini-ayt", "--dry-run", "optim.lr=2e-4"])
    assert list(tmp_path.iterdir()) == []
    assert "* optim.lr=0.0002  (default 0.0001)" in out and "  ct.q=256.0" in out
    assert "run directory: runs/mini-ayt (does not exist yet)" in out and "would start fresh: iterations 0 -> 2000" in out
    # an existing run: --resume says where it would continue; the directory is untouched
    run = evaluated_run
    before = _tree(run)
    over = [f"{k}={v}" for k, v in _overrides(run).items()]  # the run's own settings
    out = cli_out(capsys, ["train", "--dry-run", "--resume", *over, "iters=10"])
    assert f"would resume from {run / 'checkpoints' / 'ckpt-00000006.pt'}: iterations 6 -> 10" in out
    assert _tree(run) == before
    assert cli.main(["train", "--dry-run", *over]) == 2  # the same refusal as a real start
    assert "already holds a run" in capsys.readouterr().err and _tree(run) == before


def _overrides(run) -> dict:
    """The run's settings as dotted overrides."""
    from ayt.config import from_dict
    return {k: v for k, v in flatten(from_dict(json.loads((run / "config.json").read_text()))).items()}


def test_eval_dfid_flags(monkeypatch, capsys, evaluated_run):
    res = json.loads((evaluated_run / "results.json").read_text())["eval"]
    assert {r["sampler"] for r in res} == {"1step", "2step", "denoise@0.4"}
    import ayt.evaluate as E
    seen = []
    monkeypatch.setattr(E, "evaluate_run", lambda run, ecfg, which, log, track: seen.append(ecfg))
    for flags, sigmas in (([], (0.2, 0.4, 0.8)), (["--dfid"], (0.2, 0.4, 0.8)), (["--no-dfid"], ()),
                          (["--dfid-sigmas", "0.1", "0.3"], (0.1, 0.3)), (["--no-dfid", "--dfid-sigmas", "0.1"], ())):
        assert cli.main(["eval", str(evaluated_run), "--n", "100", "--runs", "1", "--device", "cpu", *flags]) == 0
        assert seen[-1].dfid_sigmas == sigmas, flags


def test_eval_warns_on_cpu_at_paper_scale(monkeypatch, capsys, evaluated_run):
    warn = cli.cpu_cost_warning(EvalConfig(device="cpu"))
    assert warn.startswith("warning: paper-scale evaluation on a CPU") and "\n" not in warn
    assert "3 run(s) x 50000 samples x (2 sampler(s) + 3 dFID sigma(s)) = 750,000 generated images" in warn
    assert "--n 2000 --runs 1 --no-dfid" in warn
    assert cli.cpu_cost_warning(EvalConfig(device="cuda")) is None
    assert cli.cpu_cost_warning(EvalConfig(n=2000, runs=1, device="cpu")) is None
    assert cli.cpu_cost_warning(EvalConfig(n=2000, runs=3, dfid_sigmas=(), device="cpu")) is None
    assert "2000 samples" in cli.cpu_cost_warning(EvalConfig(n=2000, runs=3, device="cpu"))
    import ayt.evaluate as E
    monkeypatch.setattr(E, "evaluate_run", lambda *a, **k: None)
    assert cli.main(["eval", str(evaluated_run), "--device", "cpu"]) == 0
    assert capsys.readouterr().err.count("warning: paper-scale evaluation on a CPU") == 1
    assert cli.main(["eval", str(evaluated_run), "--device", "cpu", "--n", "2000", "--runs", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_plot_writes_loss_and_score_curves(tmp_path, monkeypatch, capsys, evaluated_run):
    monkeypatch.chdir(tmp_path)
    out = cli_out(capsys, ["plot", str(evaluated_run)])
    paths = out.split()
    name = evaluated_run.name
    assert paths == [f"runs/plots/{name}-losses.png", f"runs/plots/{name}-fd_eval-1step.png",
                     f"runs/plots/{name}-fd_eval-2step.png", f"runs/plots/{name}-dfd_eval-denoise-sigma0.4.png"]
    for p in paths:
        assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = cli_out(capsys, ["plot", str(evaluated_run), str(evaluated_run), "--out", "elsewhere", "--keys", "loss_ect,lr"])
    assert out.split()[0] == f"elsewhere/{name}+{name}-losses.png"
    assert cli.main(["plot", str(evaluated_run), "--keys", "nope"]) == 2
    assert "--keys nope: not logged" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_train_with_a_missing_preset_dependency_names_the_fix(tmp_path, monkeypatch, capsys):
    """mini-ayt builds on runs/mini-diffusion; in another run root that path does not exist, and the error
    says how to point net.init at the run (before any training)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--preset", "mini-ayt", f"run_root={tmp_path / 'elsewhere'}"]) == 2
    err = capsys.readouterr().err
    assert "net.init: no such file or run directory: runs/mini-diffusion" in err
    assert "net.init=<run_root>/mini-diffusion" in err
    assert not (tmp_path / "elsewhere" / "mini-ayt" / "checkpoints").exists()
