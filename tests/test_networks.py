"""Tests for ayt.networks: EDM preconditioning, SongUNet / DhariwalUNet, named configs, EDM checkpoint import.

The parameter names, shapes, initial values and forward outputs were also checked bitwise against
NVlabs/edm's own training/networks.py (not a dependency, so not part of this suite); the key lists and
counts hard-coded below come from that comparison.
"""
import collections
import contextlib
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from ayt.networks import (NETWORK_CONFIGS, CheckpointError, DhariwalUNet, EDMCheckpoint, EDMPrecond,
                          SongUNet, UnsafeCheckpointError, build_network, count_parameters,
                          edm_precond_coefficients, load_edm_checkpoint, load_into)

TINY_DDPMPP = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   dropout=0.2, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=[1, 1])
TINY_NCSNPP = dict(TINY_DDPMPP, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   resample_filter=[1, 3, 3, 1])
TINY_SKIP = dict(TINY_NCSNPP, encoder_type="skip", decoder_type="skip")
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=0.1)
TINY = {"ddpmpp": TINY_DDPMPP, "ncsnpp": TINY_NCSNPP, "skip": TINY_SKIP, "adm": TINY_ADM}


def tiny_net(kind: str, label_dim: int = 0, seed: int = 0, **kw) -> EDMPrecond:
    """An 8x8 EDMPrecond with all parameters randomised (EDM's zero-initialised output layers would
    otherwise hide wiring errors)."""
    torch.manual_seed(seed)
    net = build_network(TINY[kind], img_resolution=8, img_channels=3, label_dim=label_dim, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def batch(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.exp(torch.randn(n, generator=g))


# ----------------------------------------------------------------------------------------------
# Preconditioning (docs/method.md section 1)

def test_precond_coefficients_at_known_sigmas():
    c_skip, c_out, c_in, c_noise = edm_precond_coefficients(torch.tensor(0.5, dtype=torch.float64), 0.5)
    assert c_skip.item() == pytest.approx(0.5, abs=1e-15)
    assert c_in.item() == pytest.approx(1 / math.sqrt(0.5), abs=1e-15)
    assert c_out.item() == pytest.approx(0.5 * 0.5 / math.sqrt(0.5), abs=1e-15)
    assert c_noise.item() == pytest.approx(math.log(0.5) / 4, abs=1e-15)
    # Boundary behaviour: sigma -> 0 gives the identity (c_skip -> 1, c_out -> 0); large sigma gives c_skip -> 0.
    s = torch.tensor([1e-8, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_precond_coefficients(s, 0.5)
    assert c_skip[0].item() == pytest.approx(1.0, abs=1e-12) and c_out[0].item() == pytest.approx(0.0, abs=1e-7)
    assert c_skip[1].item() == pytest.approx(0.25 / (6400 + 0.25)) and c_in[1].item() == pytest.approx(1 / math.sqrt(6400.25))
    # EDM's derivation (Karras et al. 2022, appendix B.6): unit variance of the network input,
    # Var(c_in (y + n)) = 1, and of the effective training target (y - c_skip (y + n)) / c_out.
    s = torch.logspace(-3, 2, 11, dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_precond_coefficients(s, 0.5)
    torch.testing.assert_close(c_in ** 2 * (0.25 + s ** 2), torch.ones_like(s))
    torch.testing.assert_close(((1 - c_skip) ** 2 * 0.25 + c_skip ** 2 * s ** 2) / c_out ** 2, torch.ones_like(s))


class _Recorder(nn.Module):
    """Stands in for F: records its inputs and returns `value` everywhere."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value = value
        self.map_augment = None

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = (x.clone(), noise_labels.clone(), class_labels)
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sigma_form", ["float", "0d", "vector"])
def test_precond_wiring_with_stub_F(sigma_form):
    net = build_network(TINY_DDPMPP, img_resolution=8, img_channels=3)
    net.model = _Recorder(0.0)
    x, _ = batch(4)
    sigma = {"float": 0.5, "0d": torch.tensor(0.5), "vector": torch.full((4,), 0.5)}[sigma_form]
    D = net(x, sigma)
    # F == 0  =>  D == c_skip x exactly, with c_skip = 0.5 at sigma = 0.5.
    assert torch.equal(D, 0.5 * x)
    x_in, c_noise, labels = net.model.seen
    torch.testing.assert_close(x_in, x / math.sqrt(0.5), rtol=1e-6, atol=0)        # c_in x
    torch.testing.assert_close(c_noise, torch.full((4,), math.log(0.5) / 4))        # ln(sigma)/4, shape [N]
    assert labels is None
    # F == 1  =>  D == c_skip x + c_out.
    net.model = _Recorder(1.0)
    torch.testing.assert_close(net(x, sigma), 0.5 * x + 0.5 * 0.5 / math.sqrt(0.5))


def test_precond_input_validation():
    net = build_network(TINY_DDPMPP, img_resolution=8, img_channels=3).eval()
    x, s = batch(3)
    with pytest.raises(ValueError, match="one value per sample"):
        net(x, torch.ones(2))
    with pytest.raises(ValueError, match="unconditional"):
        net(x, s, class_labels=torch.zeros(3, 10))
    net(x, s, class_labels=torch.zeros(3, 0))                     # EDM's datasets give [N, 0] labels when unconditional
    with pytest.raises(ValueError, match="augment_dim=0"):
        net(x, s, augment_labels=torch.zeros(3, 9))


# ----------------------------------------------------------------------------------------------
# Networks

@pytest.mark.parametrize("kind", ["ddpmpp", "ncsnpp", "skip", "adm"])
@pytest.mark.parametrize("label_dim", [0, 4])
def test_output_shapes_and_labels(kind, label_dim):
    net = tiny_net(kind, label_dim=label_dim)
    assert isinstance(net.model, DhariwalUNet if kind == "adm" else SongUNet)
    x, s = batch(3)
    with torch.no_grad():
        D = net(x, s)
        assert D.shape == (3, 3, 8, 8) and D.dtype == torch.float32 and torch.isfinite(D).all()
        if label_dim:
            idx = torch.tensor([0, 1, 3])
            onehot = torch.nn.functional.one_hot(idx, label_dim).float()
            D1 = net(x, s, class_labels=onehot)
            assert torch.equal(D1, net(x, s, class_labels=idx))      # integer indices are one-hot encoded
            assert not torch.allclose(D1, net(x, s, class_labels=onehot.roll(1, dims=1)))
            assert not torch.allclose(D1, D)                           # None means all-zero labels (EDM)
    assert ("model.map_label.weight" in net.state_dict()) == bool(label_dim)


def test_augment_dim_creates_map_augment():
    net = tiny_net("ddpmpp", augment_dim=9)
    assert net.model.map_augment.weight.shape == (16, 9)    # [noise_channels, augment_dim]
    x, s = batch(3)
    with torch.no_grad():
        assert not torch.allclose(net(x, s, augment_labels=torch.ones(3, 9)), net(x, s))
    assert build_network(TINY_DDPMPP, 8, 3).model.map_augment is None


def test_dropout_mask_reproduced_by_forked_rng():
    net = tiny_net("ddpmpp").train()
    x, s = batch(3)

    def run(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return net(x, s)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    net.eval()
    assert torch.equal(net(x, s), net(x, s))


def test_bf16_autocast_matches_float32():
    net = tiny_net("ncsnpp")
    x, s = batch(3)
    with torch.no_grad():
        ref = net(x, s)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, s)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


# ----------------------------------------------------------------------------------------------
# Parameter names, shapes and counts (equal to EDM's)

def _meta_net(name, res, label_dim=0, **kw):
    with torch.device("meta"):
        return build_network(name, res, 3, label_dim=label_dim, **kw)


def test_ddpmpp_cifar10_keys_and_shapes_are_edms():
    sd = _meta_net("ddpmpp-cifar10", 32).state_dict()
    assert len(sd) == 424
    expected = {
        "model.map_layer0.weight": (512, 128), "model.map_layer0.bias": (512,), "model.map_layer1.weight": (512, 512),
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3), "model.enc.32x32_block0.affine.weight": (256, 512),
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2), "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "model.enc.16x16_block0.norm2.weight": (256,), "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.enc.16x16_block0.proj.weight": (256, 256, 1, 1),
        "model.dec.8x8_in0.qkv.weight": (768, 256, 1, 1), "model.dec.8x8_in1.conv1.weight": (256, 256, 3, 3),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "model.dec.16x16_block4.qkv.weight": (768, 256, 1, 1), "model.dec.16x16_block4.skip.weight": (256, 512, 1, 1),
        "model.dec.32x32_aux_norm.weight": (256,), "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    for absent in ("model.map_noise.freqs", "model.map_augment.weight", "model.map_label.weight",
                   "model.dec.16x16_block0.qkv.weight", "model.enc.32x32_conv.resample_filter"):
        assert absent not in sd
    assert list(sd)[:5] == ["model.map_layer0.weight", "model.map_layer0.bias", "model.map_layer1.weight",
                            "model.map_layer1.bias", "model.enc.32x32_conv.weight"]


def test_ncsnpp_and_adm_keys():
    sd = _meta_net("ncsnpp-cifar10", 32).state_dict()
    assert len(sd) == 431
    assert tuple(sd["model.map_noise.freqs"].shape) == (128,)                      # Fourier features are a buffer
    assert tuple(sd["model.map_layer0.weight"].shape) == (512, 256)                # channel_mult_noise = 2
    assert tuple(sd["model.enc.16x16_aux_residual.weight"].shape) == (256, 3, 3, 3)
    assert tuple(sd["model.enc.16x16_aux_residual.resample_filter"].shape) == (1, 1, 4, 4)  # [1,3,3,1]
    sd = _meta_net("adm-imagenet64", 64, label_dim=1000).state_dict()
    assert len(sd) == 553
    assert tuple(sd["model.map_label.weight"].shape) == (768, 1000) and "model.map_label.bias" not in sd
    assert tuple(sd["model.enc.64x64_conv.weight"].shape) == (192, 3, 3, 3)
    assert tuple(sd["model.enc.32x32_block0.qkv.weight"].shape) == (1152, 384, 1, 1)
    assert tuple(sd["model.out_conv.weight"].shape) == (3, 192, 3, 3)


def test_parameter_counts():
    # "55.7M" (ECT/AYT) is the unconditional CIFAR-10 DDPM++ WITHOUT map_augment (ECT trains with
    # --augment=0): 55,732,739 parameters. EDM's own CIFAR-10 snapshots (edm-cifar10-32x32-uncond-vp.pkl)
    # have augment_dim=9, i.e. 1,152 more (9 x 128, no bias): 55,733,891, also "55.7M". Buffers not counted.
    assert count_parameters(_meta_net("ddpmpp-cifar10", 32)) == 55_732_739
    assert count_parameters(_meta_net("ddpmpp-cifar10", 32, augment_dim=9)) == 55_733_891
    assert count_parameters(_meta_net("adm-imagenet64", 64, label_dim=1000)) == 295_899_267   # EDM: 296M
    assert count_parameters(_meta_net("mini-shapes16", 16)) == 1_703_843


def test_build_network_errors_and_isolation():
    with pytest.raises(ValueError, match="known: ddpmpp-cifar10, ncsnpp-cifar10, adm-imagenet64, mini-shapes16"):
        build_network("ddpm-cifar", 32, 3)
    with pytest.raises(ValueError, match="unknown SongUNet argument"):
        build_network(dict(TINY_DDPMPP, num_layers=3), 8, 3)
    with pytest.raises(ValueError, match="unknown model_type"):
        build_network(dict(model_type="UNet2D"), 8, 3)
    net = build_network("mini-shapes16", 16, 3, dropout=0.0)
    assert net.init_kwargs["dropout"] == 0.0 and NETWORK_CONFIGS["mini-shapes16"]["dropout"] == 0.1
    assert EDMPrecond(**net.init_kwargs).init_kwargs == net.init_kwargs


# ----------------------------------------------------------------------------------------------
# EDM checkpoint import: a synthetic pickle in EDM's torch_utils.persistence layout

class _FakePersistent:
    """Pickles like an EDM @persistent_class instance: _reconstruct_persistent_obj(meta)."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def _edm_reconstruct_stub(meta):  # never called: only its name is pickled
    raise AssertionError("the loader must not call EDM's reconstruct hook")


@contextlib.contextmanager
def _fake_edm_modules():
    """sys.modules entries torch_utils.persistence and dnnlib.util, present only while pickling."""
    persistence = types.ModuleType("torch_utils.persistence")
    _edm_reconstruct_stub.__module__ = "torch_utils.persistence"
    _edm_reconstruct_stub.__qualname__ = _edm_reconstruct_stub.__name__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _edm_reconstruct_stub
    util = types.ModuleType("dnnlib.util")
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = easy
    names = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    assert not any(n in sys.modules for n in names)
    sys.modules.update(names)
    try:
        yield easy
    finally:
        for n in names:
            del sys.modules[n]


def _as_edm_pickle_tree(module: nn.Module, payload: str, init_kwargs: dict | None = None):
    """Our module tree re-expressed as EDM pickles it: EDM classes as persistent records holding the
    module's __dict__ (plus _init_args/_init_kwargs), torch.nn.ModuleDict as a real torch object."""
    state = dict(module.__dict__)
    children = collections.OrderedDict((k, None if v is None else _as_edm_pickle_tree(v, payload))
                                       for k, v in module._modules.items())
    if isinstance(module, nn.ModuleDict):
        md = nn.ModuleDict()
        md.__dict__["_modules"] = children
        return md
    state["_modules"] = children
    if "skip_scale" in state:
        state["skip_scale"] = np.float64(state["skip_scale"])      # EDM stores np.sqrt(0.5): a numpy scalar
    state.pop("init_kwargs", None)
    state["_init_args"] = ()
    state["_init_kwargs"] = init_kwargs or {}
    meta = dict(type="class", version=6, module_src=payload, class_name=type(module).__name__, state=state)
    return _FakePersistent(meta)


def _write_edm_pickle(path, net: EDMPrecond, marker, class_name="EDMPrecond", protocol=4):
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"
    kwargs = dict(net.init_kwargs, use_fp16=False)
    for k in ("sigma_min", "sigma_max", "sigma_data"):
        kwargs.pop(k)
    with _fake_edm_modules() as EasyDict:
        ema = _as_edm_pickle_tree(net, payload, init_kwargs=kwargs)
        ema.meta["class_name"] = class_name
        loss_fn = _FakePersistent(dict(type="class", version=6, module_src=payload, class_name="EDMLoss",
                                       state=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)))
        data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None,
                    dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip"))
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)


@pytest.mark.parametrize("kind,label_dim,augment_dim", [("ddpmpp", 0, 9), ("ncsnpp", 4, 0), ("adm", 3, 2)])
@pytest.mark.parametrize("protocol", [2, 4])
def test_load_synthetic_edm_pickle(tmp_path, kind, label_dim, augment_dim, protocol):
    src = tiny_net(kind, label_dim=label_dim, augment_dim=augment_dim, seed=1)
    marker = tmp_path / "marker"
    path = tmp_path / "network-snapshot.pkl"
    _write_edm_pickle(path, src, marker, protocol=protocol)
    assert "torch_utils.persistence" not in sys.modules and "dnnlib" not in sys.modules

    ckpt = load_edm_checkpoint(path)
    assert not marker.exists()                                   # module_src is never executed
    assert ckpt.class_name == "EDMPrecond" and str(path) in ckpt.source
    assert list(ckpt.state_dict) == list(src.state_dict())      # same keys, same order (buffers included)
    assert ckpt.init_kwargs["use_fp16"] is False and ckpt.init_kwargs["label_dim"] == label_dim

    # Our network built from the recorded kwargs, map_augment dropped (augment_dim=0), weights loaded strictly.
    dst = EDMPrecond(**ckpt.precond_kwargs(augment_dim=0)).eval()
    report = load_into(dst, ckpt, strict=True)
    assert report.dropped == (["model.map_augment.weight"] if augment_dim else [])
    x, s = batch(3)
    labels = torch.tensor([0, 1, 2]) if label_dim else None
    with torch.no_grad():
        assert torch.equal(dst(x, s, labels), src(x, s, labels))
    # With map_augment kept, nothing is dropped and the augmentation path matches too.
    if augment_dim:
        keep = EDMPrecond(**ckpt.precond_kwargs()).eval()
        assert load_into(keep, ckpt).dropped == []
        a = torch.randn(3, augment_dim)
        with torch.no_grad():
            assert torch.equal(keep(x, s, labels, augment_labels=a), src(x, s, labels, augment_labels=a))


def test_edm_pickle_with_cuda_storages_loads_on_cpu(tmp_path, monkeypatch):
    # EDM snapshots store each tensor storage as a nested legacy torch.save blob with its device tag.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    src = tiny_net("ddpmpp", seed=2)
    path = tmp_path / "gpu.pkl"
    _write_edm_pickle(path, src, tmp_path / "marker")
    monkeypatch.undo()
    ckpt = load_edm_checkpoint(path)
    assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())
    dst = EDMPrecond(**ckpt.precond_kwargs())
    load_into(dst, ckpt)
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


def test_load_into_refuses_other_preconditioning(tmp_path):
    src = tiny_net("ddpmpp")
    path = tmp_path / "vp.pkl"
    _write_edm_pickle(path, src, tmp_path / "marker", class_name="VPPrecond")
    ckpt = load_edm_checkpoint(path)
    with pytest.raises(ValueError, match="VPPrecond"):
        load_into(tiny_net("ddpmpp"), ckpt)
    load_into(tiny_net("ddpmpp"), ckpt, require_class=None)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
    with pytest.raises(UnsafeCheckpointError, match=r"system") as info:
        load_edm_checkpoint(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)
    assert not marker.exists()
    # Also when hidden deep inside an otherwise EDM-like snapshot.
    src = tiny_net("ddpmpp")
    good = tmp_path / "good.pkl"
    _write_edm_pickle(good, src, tmp_path / "marker")
    with _fake_edm_modules():
        data = dict(ema=_as_edm_pickle_tree(src, "pass"), dataset_kwargs=dict(hook=_Evil(marker)))
        path.write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafeCheckpointError):
        load_edm_checkpoint(path)
    assert not marker.exists()
    # A numpy object array (could carry arbitrary objects) is refused as well.
    path.write_bytes(pickle.dumps({"ema": np.array([1], dtype=object)}))
    with pytest.raises(UnsafeCheckpointError):
        load_edm_checkpoint(path)


def test_corrupt_files_raise_clear_errors(tmp_path):
    src = tiny_net("ddpmpp")
    good = tmp_path / "good.pkl"
    _write_edm_pickle(good, src, tmp_path / "marker")
    cases = {"truncated.pkl": good.read_bytes()[: len(good.read_bytes()) // 2],
             "noise.pkl": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
             "empty.pkl": b"", "text.pkl": b"hello, this is not a checkpoint\n",
             "broken.pt": b"PK\x03\x04" + b"\x00" * 100}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=str(p).replace("\\", "\\\\")):
            load_edm_checkpoint(p)
    with pytest.raises(FileNotFoundError):
        load_edm_checkpoint(tmp_path / "missing.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="expected an EDM network"):
        load_edm_checkpoint(tmp_path / "list.pkl")


@pytest.mark.parametrize("layout", ["raw", "ema", "model", "legacy"])
def test_pt_state_dict_round_trip(tmp_path, layout):
    src = tiny_net("ncsnpp", seed=3)
    sd = src.state_dict()
    obj = {"raw": sd, "ema": {"ema": sd, "init_kwargs": src.init_kwargs}, "model": {"model": sd}, "legacy": sd}[layout]
    path = tmp_path / "net.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=(layout != "legacy"))
    ckpt = load_edm_checkpoint(path)
    assert ckpt.class_name is None and str(path) in ckpt.source
    dst = EDMPrecond(**src.init_kwargs).eval() if layout != "ema" else EDMPrecond(**ckpt.precond_kwargs()).eval()
    load_into(dst, ckpt)
    x, s = batch(2)
    with torch.no_grad():
        assert torch.equal(dst(x, s), src(x, s))


def test_load_into_reports_mismatches():
    src = tiny_net("ddpmpp")
    sd = dict(src.state_dict())
    sd["model.enc.8x8_conv.weight"] = torch.zeros(16, 3, 1, 1)
    sd.pop("model.map_layer1.bias")
    sd["model.extra.weight"] = torch.zeros(1)
    ckpt = EDMCheckpoint(sd, {}, "synthetic")
    with pytest.raises(ValueError) as info:
        load_into(tiny_net("ddpmpp"), ckpt)
    msg = str(info.value)
    assert "model.enc.8x8_conv.weight: checkpoint (16, 3, 1, 1) vs network (16, 3, 3, 3)" in msg
    assert "missing keys (1): model.map_layer1.bias" in msg and "unexpected keys (1): model.extra.weight" in msg
    sd["model.enc.8x8_conv.weight"] = src.state_dict()["model.enc.8x8_conv.weight"]
    report = load_into(tiny_net("ddpmpp"), EDMCheckpoint(sd, {}, "synthetic"), strict=False)
    assert report.missing == ["model.map_layer1.bias"] and report.unexpected == ["model.extra.weight"]
