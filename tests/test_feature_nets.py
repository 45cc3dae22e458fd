"""Feature networks of ayt.feature_nets (DenseNet, ViT, denoising autoencoder) and the VGGMod / ResNet10
registry names: the authors' parameter layouts, feature shapes, use as phi, the denoising stage."""
import json
import math
from pathlib import Path

import pytest
import torch

from ayt import continuous as CT
from ayt.config import ConfigError, make_config
from ayt.feature_nets import Patchify, posemb_sincos_2d
from ayt.features import build_feature_net, freeze, feature_net_from_file
from ayt.losses import MFD
from ayt.objectives import DenoisingObjective
from ayt.train import train


def _shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _densenet_layout(c_in=3, L=15, nblocks=(3, 6, 12, 8), g=16):
    """The authors' DenseNet state dict (names, shapes), from its construction rules."""
    out, bn = {}, lambda p, c: {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,),
                                  f"{p}.running_var": (c,), f"{p}.num_batches_tracked": ()}
    planes = 2 * g
    out["conv1.weight"] = (planes, c_in, 3, 3)
    for k, n in enumerate(nblocks, 1):
        for i in range(n):
            out.update(bn(f"dense{k}.{i}.bn1", planes))
            out[f"dense{k}.{i}.conv1.weight"] = (4 * g, planes, 1, 1)
            out.update(bn(f"dense{k}.{i}.bn2", 4 * g))
            out[f"dense{k}.{i}.conv2.weight"] = (g, 4 * g, 3, 3)
            planes += g
        if k < 4:
            out.update(bn(f"trans{k}.bn", planes))
            out[f"trans{k}.conv.weight"] = (planes // 2, planes, 1, 1)
            planes //= 2
    out.update(bn("bn", planes))
    out.update({"linear.weight": (L, planes), "linear.bias": (L,)})
    return out


def _vit_layout(R=32, c_in=3, L=15, dim=1024, depth=6, heads=16, dim_head=64, mlp=2048):
    p = R // 8
    pd = c_in * p * p
    out = {"to_patch_embedding.1.weight": (pd,), "to_patch_embedding.1.bias": (pd,),
           "to_patch_embedding.2.weight": (dim, pd), "to_patch_embedding.2.bias": (dim,),
           "to_patch_embedding.3.weight": (dim,), "to_patch_embedding.3.bias": (dim,),
           "transformer.norm.weight": (dim,), "transformer.norm.bias": (dim,),
           "linear_head.weight": (L, dim), "linear_head.bias": (L,)}
    for i in range(depth):
        a, f = f"transformer.layers.{i}.0", f"transformer.layers.{i}.1.net"
        out.update({f"{a}.norm.weight": (dim,), f"{a}.norm.bias": (dim,), f"{a}.to_qkv.weight": (3 * heads * dim_head, dim),
                    f"{a}.to_out.weight": (dim, heads * dim_head), f"{f}.0.weight": (dim,), f"{f}.0.bias": (dim,),
                    f"{f}.1.weight": (mlp, dim), f"{f}.1.bias": (mlp,), f"{f}.3.weight": (dim, mlp), f"{f}.3.bias": (dim,)})
    return out


DAE_LAYOUT = {"encoder.0.weight": (16, 3, 3, 3), "encoder.0.bias": (16,), "encoder.2.weight": (16, 16, 3, 3),
              "encoder.2.bias": (16,), "encoder.6.weight": (64, 16, 3, 3), "encoder.6.bias": (64,),
              "encoder.8.weight": (64, 64, 3, 3), "encoder.8.bias": (64,),
              "decoder.0.weight": (64, 16, 3, 3), "decoder.0.bias": (16,), "decoder.2.weight": (16, 16, 3, 3),
              "decoder.2.bias": (16,), "decoder.5.weight": (16, 3, 3, 3), "decoder.5.bias": (3,),
              "decoder.7.weight": (3, 3, 3, 3), "decoder.7.bias": (3,)}


def test_authors_layouts():
    assert _shapes(build_feature_net("densenet", resolution=32)) == _densenet_layout()
    with torch.device("meta"):
        vit = build_feature_net("vit", resolution=32)
    assert _shapes(vit) == _vit_layout()
    assert _shapes(build_feature_net("dae", resolution=32)) == DAE_LAYOUT
    # VGGMod16 (use_bn, use_maxpool) is the VGG16 layout; without BN the bn entries vanish
    vgg = _shapes(build_feature_net("vgg16", resolution=32))
    assert _shapes(build_feature_net("vggmod16", resolution=32)) == vgg
    assert _shapes(build_feature_net("vggmod16-stride-nobn", resolution=32)) == {k: v for k, v in vgg.items() if ".bn." not in k}
    # the authors' current ResNet: one basic block per stage
    r10 = _shapes(build_feature_net("resnet10", resolution=32))
    assert "layer1.0.conv1.weight" in r10 and not any(k.startswith("layer1.1.") for k in r10)


@pytest.mark.parametrize("name", ["densenet", "vit-mini", "dae", "vggmod11-stride-nobn", "resnet10"])
def test_strict_state_dict_round_trip(tmp_path, name):
    torch.manual_seed(0)
    src = build_feature_net(name, resolution=16, in_channels=3, num_outputs=15)
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "clf.pt")   # DataParallel keys
    net = feature_net_from_file(tmp_path / "clf.pt", name, resolution=16, in_channels=3, num_outputs=15).eval()
    x = torch.randn(2, 3, 16, 16)
    for a, b in zip(src.eval().features(x), net.features(x)):
        assert torch.equal(a, b)
    bad = dict(src.state_dict())
    bad.pop(next(iter(bad)))
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing keys"):
        feature_net_from_file(tmp_path / "bad.pt", name, resolution=16, in_channels=3, num_outputs=15)


def test_vit_patches_and_positions():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tok = Patchify(4)(x)                                       # b c (h p1) (w p2) -> b (h w) (p1 p2 c)
    assert tok.shape == (2, 4, 48)
    for h in range(2):
        for w in range(2):
            for p1 in range(4):
                for p2 in range(4):
                    for c in range(3):
                        assert tok[1, h * 2 + w, (p1 * 4 + p2) * 3 + c] == x[1, c, h * 4 + p1, w * 4 + p2]
    pe = posemb_sincos_2d(2, 3, 8)                             # [h w, dim]: (x sin, x cos, y sin, y cos)
    omega = 1 / 10000 ** torch.tensor([0.0, 1.0])
    row = 1 * 3 + 2                                            # y = 1, x = 2
    torch.testing.assert_close(pe[row], torch.cat([(2 * omega).sin(), (2 * omega).cos(), omega.sin(), omega.cos()]))


def test_feature_shapes_and_heads():
    x = torch.randn(3, 3, 32, 32)
    dn = build_feature_net("densenet", resolution=32).eval()
    assert [tuple(f.shape[1:]) for f in dn.features(x)] == [(40, 16, 16), (68, 8, 8), (130, 4, 4), (258, 1, 1), (15, 1, 1)]
    vit = build_feature_net("vit-mini", resolution=32).eval()
    feats = vit.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 64, 1), (64, 64, 1), (15, 1, 1)]
    assert torch.equal(vit(x), feats[-1].flatten(1))
    dae = build_feature_net("dae", resolution=32).eval()
    assert [tuple(f.shape[1:]) for f in dae.features(x)] == [(16, 16, 16), (64, 8, 8)]
    assert dae(x).shape == x.shape and dae(x).abs().max() <= 1
    assert torch.equal(dae(x), dae(x))                         # eval: no dropout
    with pytest.raises(ValueError, match="multiple of 8"):
        build_feature_net("densenet", resolution=12)


@pytest.mark.parametrize("name", ["densenet", "vit-mini", "dae", "vggmod11-stride-nobn", "resnet10"])
def test_usable_as_phi_by_every_ayt_mode(name):
    torch.manual_seed(0)
    phi = freeze(build_feature_net(name, resolution=16, in_channels=3, num_outputs=15))
    a = torch.randn(2, 3, 16, 16, requires_grad=True)
    d = MFD(phi)(a, torch.randn(2, 3, 16, 16))                 # discrete AYT (mode mfd)
    (g,) = torch.autograd.grad(d.sum(), a)
    assert d.shape == (2,) and torch.isfinite(g).all() and g.abs().sum() > 0
    Y, T = CT.feature_tangent(phi, a.detach(), torch.randn(2, 3, 16, 16))   # continuous AYT tangents
    assert Y.shape == T.shape and Y.ndim == 2 and torch.isfinite(T).all()


def test_denoising_objective_arithmetic():
    net = lambda x: 0.5 * x
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss, stats = DenoisingObjective(sigma_max=1.0)(net, x0, None, 0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = torch.rand(4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    want = (0.5 * (x0 + sigma.view(-1, 1, 1, 1) * eps) - x0).flatten(1).norm(dim=1)
    torch.testing.assert_close(loss, want)
    c = 0.03 * math.sqrt(3 * 64)
    ph = DenoisingObjective(1.0, 0.03)(net, x0, None, 0, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(ph, (want ** 2 + c * c).sqrt() - c)


TINY = {"data.name": "shapes", "data.resolution": 16, "data.num_images": 256, "batch": 8, "log_every": 2,
        "ckpt_every": 3, "sample_every": 0, "device": "cpu", "iters": 3}


def test_denoising_autoencoder_stage_and_its_features_in_ayt(tmp_path):
    dae = train(make_config(None, {**TINY, "stage": "feature", "feature.arch": "dae", "feature.objective": "denoise",
                                   "feature.eval_images": 64, "ema_decay": 0.0, "run_root": str(tmp_path),
                                   "name": "dae"}))
    res = json.loads((dae / "results.json").read_text())["feature_net"]
    assert set(res["rmse"]) == {"0", "0.25", "0.5", "1"} and res["input_rmse"]["1"] == pytest.approx(1.0, rel=0.1)
    for mode in ("mfd", "cct-ayt"):
        run = train(make_config(None, {**TINY, "stage": "consistency", "net.arch": "tiny", "ct.mode": mode,
                                       "ct.feature_net": str(dae), "run_root": str(tmp_path), "name": mode}))
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss"] if "loss" in r else r["distance"]) for r in metrics)


def test_objective_and_architecture_must_match(tmp_path):
    base = {**TINY, "stage": "feature", "run_root": str(tmp_path), "name": "x"}
    with pytest.raises(ConfigError, match="must be one of dae"):
        train(make_config(None, {**base, "feature.objective": "denoise", "feature.arch": "mini-vgg"}))
    with pytest.raises(ConfigError, match="feature.objective=denoise"):
        train(make_config(None, {**base, "feature.arch": "dae"}))
    with pytest.raises(ConfigError, match="feature.objective"):
        make_config(None, {**base, "feature.objective": "recon"})
