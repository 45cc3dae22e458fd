"""Continuous-time consistency modes (ayt.continuous): the authors' CCD / CCD-AYT loop body reproduced,
JVP paths, shared dropout mask, tangent normalisation and warm-up, teacher checks, training and resume."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ayt import checkpoint as ck
from ayt import continuous as CT
from ayt.config import ConfigError, make_config
from ayt.features import build_feature_net, freeze
from ayt.networks import build_network
from ayt.train import train
from test_train import _assert_same_state

TINY = {"data.name": "shapes", "data.resolution": 16, "data.num_images": 256, "net.arch": "tiny",
        "batch": 8, "log_every": 2, "ckpt_every": 3, "sample_every": 0, "device": "cpu"}


def _nets(seed=0):
    torch.manual_seed(seed)
    student = build_network("tiny", 16, 3).train()          # dropout 0.1: the shared mask matters
    torch.manual_seed(seed + 1)
    teacher = build_network("tiny", 16, 3).eval().requires_grad_(False)
    torch.manual_seed(seed + 2)
    phi = freeze(build_feature_net("mini-vgg", resolution=16, in_channels=3, num_outputs=15))
    return student, teacher, phi


def _draws(n, seed, P_mean=-1.1, P_std=2.0):
    """The objective's draws from its generator: t (lognormal), then eps."""
    g = torch.Generator().manual_seed(seed)
    t = (P_mean + P_std * torch.randn(n, generator=g)).exp()
    eps = torch.randn(n, 3, 16, 16, generator=g)
    return t, eps


def _authors_loop_body(unet, denoiser, x0, eps, sip1, clf=None, broadcast=True):
    """The CCD / CCD-AYT iteration of the authors' scripts (train_ccd.py, train_ccd_ayt.py) in plain torch:
    the student's RNG state is saved once and set before each of its two calls (their rng_state argument)."""
    xsip1 = x0 + eps * sip1.reshape(-1, 1, 1, 1)
    flat = lambda feats: torch.cat([f.flatten(start_dim=1) for f in feats], dim=1)
    with torch.no_grad():
        v = (xsip1 - denoiser(xsip1, sip1)) / sip1.reshape(-1, 1, 1, 1)
        rng_state = torch.get_rng_state()

        def fwd(x, t):
            torch.set_rng_state(rng_state)
            out = unet(x, t)
            return out if clf is None else flat(clf.features(out))
        _, tangent = torch.func.jvp(fwd, (xsip1, sip1), (v, torch.ones_like(sip1)))
        dims = (1, 2, 3) if clf is None else 1
        tangent_norm = torch.linalg.vector_norm(tangent, dim=dims, keepdim=True)
        tangent_norm = tangent_norm * np.sqrt(tangent_norm.numel() / tangent.numel())
        tangent = tangent / (tangent_norm + 0.1)
    Y = fwd(xsip1, sip1)
    w_ccd = 1 / sip1.reshape(-1, 1, 1, 1)
    if clf is None:
        return (w_ccd * Y * tangent).sum(dim=(1, 2, 3)).mean()
    if broadcast:                         # as written: [N,1,1,1] * [N,F] broadcasts to [N,1,N,F]
        return (w_ccd * Y * tangent).sum(dim=1).mean()
    return (w_ccd.reshape(-1, 1) * Y * tangent).sum(dim=1).mean()


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def _compare(student, ours_fn, ref_fn, exact):
    torch.manual_seed(7)
    student.zero_grad(set_to_none=True)
    loss_ref = ref_fn()
    loss_ref.backward()
    g_ref = _grads(student)
    torch.manual_seed(7)
    student.zero_grad(set_to_none=True)
    loss = ours_fn()
    loss.backward()
    g = _grads(student)
    if exact:  # the same arithmetic in the same order: bitwise
        assert torch.equal(loss, loss_ref)
        for k in g_ref:
            assert torch.equal(g[k], g_ref[k]), k
    else:      # another reduction order: float rounding
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], rtol=1e-5, atol=1e-9, msg=k)
    return loss


def test_ccd_reproduces_authors_loop_body():
    student, teacher, _ = _nets()
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    t, eps = _draws(6, 11)
    obj = CT.ContinuousObjective("ccd", denoiser=teacher)

    def ours():
        loss, stats = obj(student, x0, None, 0, torch.Generator().manual_seed(11), teacher=student)
        assert loss.shape == (6,) and set(stats) == {"loss", "tangent_rms"}
        return loss.mean()
    _compare(student, ours, lambda: _authors_loop_body(student, teacher, x0, eps, t), exact=True)


@pytest.mark.parametrize("weighting", ["per-sample", "batch-mean"])
def test_ccd_ayt_reproduces_authors_loop_body(weighting):
    student, teacher, phi = _nets(3)
    x0 = torch.rand(5, 3, 16, 16) * 2 - 1
    t, eps = _draws(5, 5)
    obj = CT.ContinuousObjective("ccd-ayt", denoiser=teacher, phi=phi, weighting=weighting)
    ours = lambda: obj(student, x0, None, 0, torch.Generator().manual_seed(5), teacher=student)[0].mean()
    ref = lambda: _authors_loop_body(student, teacher, x0, eps, t, clf=phi, broadcast=weighting == "batch-mean")
    _compare(student, ours, ref, exact=weighting == "per-sample")


def test_broadcast_weighting_identity():
    """The authors' broadcast value equals mean_i(1/t_i) * mean_{j,f}(Y_jf T_jf); per-sample differs."""
    g = torch.Generator().manual_seed(0)
    Y, T = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    t = torch.rand(4, generator=g) + 0.1
    as_written = (1 / t.reshape(-1, 1, 1, 1) * Y * T).sum(dim=1).mean()
    torch.testing.assert_close(CT.continuous_loss(Y, T, t, "batch-mean").mean(), as_written)
    torch.testing.assert_close(as_written, (1 / t).mean() * (Y * T).mean())
    per_sample = CT.continuous_loss(Y, T, t, "per-sample")
    torch.testing.assert_close(per_sample, (Y * T).sum(1) / t)
    assert not torch.allclose(per_sample.mean(), as_written)


def test_jvp_paths_agree_and_share_the_dropout_mask():
    student, _, phi = _nets(1)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.3, 1.0, 5.0])
    v = torch.randn_like(x)
    torch.manual_seed(0)
    D_f, T_f = CT.output_tangent(student, x, t, v, jvp=CT.JVP("func"))
    D_again = student(x, t)                       # the RNG was restored: same dropout mask
    assert torch.equal(D_f, D_again)
    assert not torch.equal(student(x, t), D_again)  # a fresh mask differs (dropout is active)
    torch.manual_seed(0)
    D_b, T_b = CT.output_tangent(student, x, t, v, jvp=CT.JVP("double-backward"))
    assert torch.equal(D_b, D_f)
    torch.testing.assert_close(T_b, T_f, rtol=1e-4, atol=1e-5)
    # finite differences along (v, 1) in eval mode
    student.eval()
    _, T_e = CT.output_tangent(student, x, t, v)
    h = 1e-3
    fd = (student(x + h * v, t + h) - student(x - h * v, t - h)) / (2 * h)
    torch.testing.assert_close(T_e, fd, rtol=2e-2, atol=2e-3)
    # the feature tangent is the JVP of the composition (chain rule)
    D, T = CT.output_tangent(student, x, t, v)
    _, TF = CT.feature_tangent(phi, D, T)
    _, TF_joint = CT.jvp_func(lambda a, s: CT.flatten_features(phi.features(student(a, s))), (x, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(TF, TF_joint, rtol=1e-5, atol=1e-6)


def test_auto_jvp_falls_back_to_double_backward():
    class NoForwardAD(torch.autograd.Function):  # a custom op without a jvp rule
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos()

    fn = lambda x, s: NoForwardAD.apply(x) * s.reshape(-1, 1)
    x, s = torch.randn(3, 4), torch.rand(3) + 0.5
    v = torch.randn(3, 4)
    jvp = CT.JVP("auto")
    with pytest.warns(UserWarning, match="double backward"):
        out, T = jvp(fn, (x, s), (v, torch.ones_like(s)))
    assert jvp.impl == "double-backward"
    torch.testing.assert_close(T, x.cos() * v * s.reshape(-1, 1) + x.sin())
    with pytest.raises(Exception):
        CT.JVP("func")(fn, (x, s), (v, torch.ones_like(s)))


def test_normalize_tangent():
    T = torch.randn(4, 3, 5, 5) * torch.tensor([0.01, 1, 10, 100]).reshape(-1, 1, 1, 1)
    dim = 75
    n = T.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(CT.normalize_tangent(T, 0.1, "rms"), T / (n / math.sqrt(dim) + 0.1))
    torch.testing.assert_close(CT.normalize_tangent(T, 0.1, "l2"), T / (n + 0.1))
    assert CT.normalize_tangent(T, 0.1, "none") is T
    big = CT.normalize_tangent(T, 0.0, "rms")
    torch.testing.assert_close(CT.tangent_rms(big), torch.ones(4))


def test_warmup_tangent_without_network_term():
    """With F constant in (x, t), the full tangent equals the F-held-fixed tangent; warm-up 0 gives it."""
    net = build_network("tiny", 16, 3).eval()
    F_const = torch.randn(2, 3, 16, 16)
    net.model.forward = lambda x, noise_labels, class_labels=None, augment_labels=None: F_const + 0 * x.sum()
    x, v = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.2, 3.0])
    D, T = CT.output_tangent(net, x, t, v)
    torch.testing.assert_close(CT.edm_tangent_without_network(D, x, t, v), T, rtol=1e-5, atol=1e-6)
    assert CT.tangent_warmup(0, 0) == 1.0 and CT.tangent_warmup(4, 10) == 0.5 and CT.tangent_warmup(20, 10) == 1.0


def test_ct_uses_eps_as_velocity():
    student, _, phi = _nets(2)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t, eps = _draws(4, 9)
    obj = CT.ContinuousObjective("cct-ayt", phi=phi)
    torch.manual_seed(1)
    loss, _ = obj(student, x0, None, 0, torch.Generator().manual_seed(9), teacher=student)
    torch.manual_seed(1)
    Y, T, _ = CT.continuous_step(student, student, x0, eps, t, eps, phi=phi)
    torch.testing.assert_close(loss, CT.continuous_loss(Y, T, t))


def test_objective_checks_its_pieces():
    student, teacher, phi = _nets()
    with pytest.raises(ValueError, match="needs diffusion teacher"):
        CT.ContinuousObjective("ccd")
    with pytest.raises(ValueError, match="takes no diffusion teacher"):
        CT.ContinuousObjective("cct", denoiser=teacher)
    with pytest.raises(ValueError, match="needs feature network"):
        CT.ContinuousObjective("cct-ayt")
    with pytest.raises(ConfigError, match="continuous.teacher"):
        make_config(None, {**TINY, "ct.mode": "ccd"})
    with pytest.raises(ConfigError, match="continuous.weighting"):
        make_config(None, {**TINY, "ct.mode": "cct", "continuous.weighting": "mean"})


# ----------------------------------------------------------------------------------------------
# Through the training loop

def cfg_for(root, stage, **over):
    base = dict(TINY, stage=stage, run_root=str(root), name=f"{stage}-{over.pop('tag', 'run')}", iters=6)
    if stage == "feature":
        base.update({"feature.arch": "mini-vgg", "feature.p_ramp_iters": 2, "feature.eval_images": 64, "ema_decay": 0.0})
    if stage == "consistency":
        base.update({"optim.lr": 5e-4, "ema_decay": 0.9})
    base.update(over)
    return make_config(None, base)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cont")
    return {"feature": train(cfg_for(root, "feature", iters=3, ckpt_every=3)),
            "diffusion": train(cfg_for(root, "diffusion", iters=3, ckpt_every=3))}


def _cont_cfg(root, runs, mode, **over):
    return cfg_for(root, "consistency", tag=mode, **{"ct.mode": mode, "net.init": str(runs["diffusion"]),
                                                     "ct.feature_net": str(runs["feature"]), **over})


def _read_metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ccd", "ccd-ayt", "cct", "cct-ayt"])
def test_modes_train_end_to_end(tmp_path, runs, mode):
    run = train(_cont_cfg(tmp_path, runs, mode, iters=4, ckpt_every=4))
    m = _read_metrics(run)
    assert [r["iteration"] for r in m] == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["tangent_rms"] > 0 for r in m)
    before = ck.load_checkpoint(ck.resolve_checkpoint(runs["diffusion"]))["ema"]
    after = ck.load_checkpoint(ck.resolve_checkpoint(run))["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ccd_ayt_resume_is_bitwise_exact(tmp_path, runs):
    straight = train(_cont_cfg(tmp_path / "a", runs, "ccd-ayt"))
    half = _cont_cfg(tmp_path / "b", runs, "ccd-ayt")
    train(half, stop_after=3)
    resumed = train(half, resume=True)
    _assert_same_state(ck.load_checkpoint(ck.resolve_checkpoint(straight)), ck.load_checkpoint(ck.resolve_checkpoint(resumed)))
    assert _read_metrics(straight) == [{**r, "it_per_s": s["it_per_s"], "time_s": s["time_s"]}
                                       for r, s in zip(_read_metrics(resumed), _read_metrics(straight))]


def _refused(root, runs, match, exc=Exception, **over):
    cfg = _cont_cfg(root, runs, "ccd", **over)
    with pytest.raises(exc, match=match):
        train(cfg)
    assert not ck.list_checkpoints(Path(cfg.run_root) / cfg.name)


def test_incompatible_teacher_is_refused_before_training(tmp_path, runs):
    _refused(tmp_path / "a", runs, "no such run directory", FileNotFoundError, **{"continuous.teacher": str(tmp_path / "nope")})
    _refused(tmp_path / "b", runs, "'feature' run; CCD needs a diffusion model", CT.TeacherError,
             **{"continuous.teacher": str(runs["feature"])})
    state = ck.load_checkpoint(ck.resolve_checkpoint(runs["diffusion"]))
    wrong_res = dict(state, config=dict(state["config"], data=dict(state["config"]["data"], resolution=32)))
    ck.save_atomic(wrong_res, tmp_path / "res32.pt")
    _refused(tmp_path / "c", runs, "trained at 32 px, 3 channels", CT.TeacherError,
             **{"continuous.teacher": str(tmp_path / "res32.pt")})
    ck.save_atomic(dict(state, img_channels=1), tmp_path / "grey.pt")
    _refused(tmp_path / "d", runs, "1 channels", CT.TeacherError, **{"continuous.teacher": str(tmp_path / "grey.pt")})
    consistency = dict(state, stage="consistency", config=dict(state["config"], stage="consistency",
                                                            ct=dict(state["config"]["ct"], mode="ect")))
    ck.save_atomic(consistency, tmp_path / "cm.pt")
    _refused(tmp_path / "e", runs, "'consistency' run", CT.TeacherError, **{"continuous.teacher": str(tmp_path / "cm.pt")})
    torch.save(build_network("mini-shapes16", 16, 3).state_dict(), tmp_path / "other-arch.pt")
    _refused(tmp_path / "f", runs, "does not fit net.arch='tiny'", CT.TeacherError,
             **{"continuous.teacher": str(tmp_path / "other-arch.pt")})
    # a plain state dict of the right architecture is accepted as teacher
    torch.save(state["ema"], tmp_path / "ok.pt")
    teacher = CT.load_teacher(str(tmp_path / "ok.pt"), _cont_cfg(tmp_path / "g", runs, "ccd"), 3, 0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_edm_pickle_teacher(tmp_path, runs):
    """An EDM snapshot (synthetic, EDM's pickle layout) is a teacher; one for another resolution is refused."""
    from test_networks import _write_edm_pickle
    cfg = _cont_cfg(tmp_path / "run", runs, "ccd")
    torch.manual_seed(0)
    net16 = build_network("tiny", 16, 3)
    _write_edm_pickle(tmp_path / "edm16.pkl", net16, tmp_path / "marker")
    teacher = CT.load_teacher(str(tmp_path / "edm16.pkl"), cfg, 3, 0)
    for k, v in net16.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    _write_edm_pickle(tmp_path / "edm32.pkl", build_network("tiny", 32, 3), tmp_path / "marker")
    with pytest.raises(CT.TeacherError, match="network for 32 px"):
        CT.load_teacher(str(tmp_path / "edm32.pkl"), cfg, 3, 0)
    assert not (tmp_path / "marker").exists()


def test_resume_of_a_run_written_before_the_continuous_group(tmp_path, runs):
    """A config.json without the `continuous` group (older runs) resumes: missing groups read as defaults."""
    cfg = _cont_cfg(tmp_path, runs, "cct", iters=4)
    train(cfg, stop_after=3)
    assert ck.list_checkpoints(Path(cfg.run_root) / cfg.name)[-1][0] == 3
    cfg_file = Path(cfg.run_root) / cfg.name / "config.json"
    old = json.loads(cfg_file.read_text())
    del old["continuous"]
    cfg_file.write_text(json.dumps(old))
    train(cfg, resume=True)
    assert ck.list_checkpoints(Path(cfg.run_root) / cfg.name)[-1][0] == 4


def test_adaptive_loss_gradient_and_optimum():
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(3, 2, 4, 4, generator=g).requires_grad_(True)
    G = torch.randn(3, 2, 4, 4, generator=g)
    dim = 32
    w_star = (dim / G.flatten(1).square().sum(1)).log()            # e^w ||G||^2 / dim = 1
    w = (w_star + torch.tensor([0.0, 0.5, -0.5])).requires_grad_(True)
    loss = CT.adaptive_loss(Y, G, w)
    gY, gw = torch.autograd.grad(loss.sum(), (Y, w))
    torch.testing.assert_close(gY, 2 * w.detach().exp().reshape(-1, 1, 1, 1) / dim * G)
    assert abs(gw[0]) < 1e-5 and gw[1] > 0 and gw[2] < 0           # minimum at w_star
    aw = CT.AdaptiveWeight()
    assert torch.equal(aw(torch.tensor([0.01, 1.0, 80.0])), torch.zeros(3))


def test_ct_with_sCM_stabilisers_trains_and_resumes_bitwise(tmp_path, runs):
    over = {"continuous.adaptive_weighting": True, "continuous.tangent_warmup_iters": 4,
            "continuous.tangent_norm": "l2"}
    straight = train(_cont_cfg(tmp_path / "a", runs, "cct", **over))
    half = _cont_cfg(tmp_path / "b", runs, "cct", **over)
    train(half, stop_after=3)
    resumed = train(half, resume=True)
    a, b = ck.load_checkpoint(ck.resolve_checkpoint(straight)), ck.load_checkpoint(ck.resolve_checkpoint(resumed))
    _assert_same_state(a, b)
    for k in a["objective"]:
        assert torch.equal(a["objective"][k], b["objective"][k]), k
    assert a["objective"]["linear.bias"].abs().item() > 0               # the weighting was trained
    assert all("adaptive_w" in r for r in _read_metrics(straight))


@pytest.mark.slow
def test_torchrun_two_processes_ccd_ayt_and_adaptive_weight(tmp_path, runs):
    """2 processes (gloo): the JVP on the bare module beside the DDP forward, the adaptive weight's
    gradients averaged by hand; both replicas end with identical weights."""
    import os
    import subprocess
    import sys
    args = ["name=ddp", f"run_root={tmp_path}", "stage=consistency", "iters=4", "ckpt_every=2", "ct.mode=ccd-ayt",
            f"net.init={runs['diffusion']}", f"ct.feature_net={runs['feature']}", "ct.feature_arch=mini-vgg",
            "continuous.adaptive_weighting=true", "batch_per_device=2",
            *[f"{k}={v}" for k, v in TINY.items() if k != "ckpt_every"]]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "ayt", "train", *args], cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["ddp"] == {"world_size": 2, "max_param_diff_across_ranks": 0.0}
