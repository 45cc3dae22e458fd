"""The faster training step keeps the arithmetic: the default step equals a frozen copy of the step
before the speed work (tests/frozen_reference.py) bitwise on the CPU, the opt-in settings stay within
float rounding, and the host-sync-free NaN check still never lets a non-finite update reach a checkpoint."""
import pytest
import torch

import frozen_reference as ref
from ayt import checkpoint as ck
from ayt.config import ConfigError, make_config
from ayt.train import NonFiniteLossError, train, update_ema
from test_train import nan_loss_from

SMALL = {"net.arch": "tiny", "data.resolution": 16, "ct.feature_arch": "mini-vgg", "net.dropout": 0.2}


@pytest.mark.parametrize("mode", ["ECT", "AYT"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_default_step_is_bitwise_todays(mode, precision):
    """Loss statistics of 2 steps, first-step gradients, weights and EMA after them: bitwise equal
    (the residual sums in place, the branch-free teacher, the multi-tensor EMA change no arithmetic;
    under bf16 autocast the in-place sum falls back where the dtype would be promoted)."""
    over = {**SMALL, "precision": precision}
    res = ref.compare_steps("cifar10-ayt", over, "cpu", batch=3, mode=mode, iters=2)
    assert res["bitwise"], res


def test_radam_foreach_within_rounding_adam_foreach_bitwise():
    """RAdam's multi-tensor step orders its arithmetic differently from the per-parameter loop:
    weights after a step agree to float32 rounding of the update (measured here < 1e-6 relative to
    the weights' scale); Adam's is bitwise."""
    res = ref.compare_steps("cifar10-ayt", {**SMALL, "optim.foreach": True}, "cpu", batch=3, mode="ECT", iters=2)
    assert res["param_rel"] < 1e-6 and res["grad_rel"] == 0.0, res
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (5, 7)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    final = []
    for foreach in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.Adam(params, lr=1e-3, foreach=foreach)
        for gs in grads:
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            opt.step()
        final.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*final))


def test_multi_tensor_ema_is_bitwise_the_loop():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    ema1, ema2 = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    ema2.load_state_dict(ema1.state_dict())
    for _ in range(3):
        update_ema(ema1, a, 0.9)
        ref.update_ema(ema2, a, 0.9)
        a, b = b, a
    assert all(torch.equal(p, q) for p, q in zip(ema1.parameters(), ema2.parameters()))


def test_channels_last_within_rounding():
    res = ref.compare_steps("cifar10-ayt", {**SMALL, "channels_last": True}, "cpu", batch=3, mode="AYT", iters=1)
    assert res["loss_rel"] < 1e-5 and res["grad_rel"] < 1e-4, res


def test_nan_check_every_n_never_checkpoints_a_non_finite_update(tmp_path, monkeypatch):
    """With nan_check_every=100 the loss is checked only every 100 iterations and before every log,
    checkpoint, sample or evaluation: a NaN at iteration 4 goes unseen until the check before the
    checkpoint of iteration 6, which is then not written (the one of iteration 3 is clean)."""
    nan_loss_from(monkeypatch, 4)
    cfg = make_config(None, {"stage": "diffusion", "data.name": "shapes", "data.resolution": 16, "data.num_images": 64,
                             "net.arch": "tiny", "batch": 4, "iters": 8, "log_every": 100, "ckpt_every": 3,
                             "sample_every": 0, "device": "cpu", "run_root": str(tmp_path), "name": "nan",
                             "nan_check_every": 100})
    with pytest.raises(NonFiniteLossError, match="first at iteration 4 .checked at iteration 5"):
        train(cfg)
    assert [it for it, _ in ck.list_checkpoints(tmp_path / "nan")] == [3]
    for k, v in ck.load_checkpoint(ck.resolve_checkpoint(tmp_path / "nan"))["model"].items():
        assert torch.isfinite(v).all(), k
    with pytest.raises(ConfigError, match="nan_check_every"):
        make_config(None, {"nan_check_every": 0})


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """compile=true: one ECT and one AYT step of the tiny net (dropout 0.2) compiled with torch.compile
    against eager, from the same weights and seeds. Tolerance: loss 1e-5 and gradients 1e-4 relative
    (inductor fuses and reorders float32 arithmetic); the dropout masks are eager's (fallback_random),
    so student and teacher share one mask as in eager."""
    for mode in ("ECT", "AYT"):
        res = ref.compare_steps("cifar10-ayt", {**SMALL, "compile": True}, "cpu", batch=3, mode=mode, iters=1)
        assert res["loss_rel"] < 1e-5 and res["grad_rel"] < 1e-4, (mode, res)
