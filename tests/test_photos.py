"""The built-in photos data: crops of scikit-image's photographs (small crop sets: fast enough for CI)."""
import os

import pytest
import torch

from ayt import data as D
from ayt.config import ConfigError, DataConfig, make_config

N = 4 * len(D.PHOTO_SOURCES) + 3  # a few crops per photograph, unequal counts (balance check)


def test_photographs_load_offline_and_grey_ones_are_replicated():
    photos = D.load_photos(4.0)
    assert len(photos) == len(D.PHOTO_SOURCES) == 14
    for p, src in zip(photos, D.PHOTO_SOURCES):
        assert p.dtype == torch.uint8 and p.ndim == 3 and p.shape[0] == 3
        assert min(p.shape[1:]) >= 40  # shrunk 4x, the smallest (text) is 43 px high
        grey = bool((p[0] == p[1]).all() and (p[1] == p[2]).all())
        assert grey == src.grayscale, src.name
    full = D.load_photos(1.0)
    assert tuple(full[0].shape[1:]) == (512, 512) and tuple(photos[0].shape[1:]) == (128, 128)  # astronaut
    assert all(src.licence and src.source for src in D.PHOTO_SOURCES)


@pytest.mark.parametrize("res", [8, 16, 32])
def test_crops_are_seeded_labelled_windows_of_their_photograph(res):
    images, labels, boxes = D.make_photo_crops(N, res, 4.0, seed=3)
    again = D.make_photo_crops(N, res, 4.0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((images, labels, boxes), again))  # bitwise from the seed
    other = D.make_photo_crops(N, res, 4.0, seed=4)
    assert not torch.equal(images, other[0])
    assert images.shape == (N, 3, res, res) and images.dtype == torch.uint8
    counts = torch.bincount(labels, minlength=14)
    assert counts.max() - counts.min() <= 1 and int(counts.sum()) == N  # balanced classes
    photos = D.load_photos(4.0)
    for x, k, (top, left, h, w) in zip(images, labels.tolist(), boxes.tolist()):
        assert h == w == res
        assert torch.equal(x, photos[k][:, top:top + h, left:left + w])  # the crop is its box of photo k


def _overlap(a, b):
    """Pairwise overlap of boxes a [n, 4] and b [m, 4] (top, left, h, w) -> bool [n, m]."""
    rows = (a[:, None, 0] < b[None, :, 0] + b[None, :, 2]) & (b[None, :, 0] < a[:, None, 0] + a[:, None, 2])
    cols = (a[:, None, 1] < b[None, :, 1] + b[None, :, 3]) & (b[None, :, 1] < a[:, None, 1] + a[:, None, 3])
    return rows & cols


@pytest.mark.parametrize("res", [16, 32])
def test_train_and_test_crops_never_overlap(res):
    n = 40 * len(D.PHOTO_SOURCES)
    _, ltr, btr = D.make_photo_crops(n, res, 4.0, seed=0, split="train")
    _, lte, bte = D.make_photo_crops(n, res, 4.0, seed=0, split="test")
    photos = D.load_photos(4.0)
    for k, p in enumerate(photos):
        a, b = btr[ltr == k], bte[lte == k]
        assert len(a) and len(b)
        assert not _overlap(a, b).any(), D.PHOTO_SOURCES[k].name
        # the held-out strip lies at the end of the longer side and is at least one crop wide
        axis, lo, hi = D.photo_regions(p.shape[1], p.shape[2], res, "test")
        col = axis  # boxes hold (top, left): axis 0 (rows) is index 0, axis 1 (columns) index 1
        assert int(b[:, col].min()) >= lo and int(b[:, col].max()) <= hi
        assert int((a[:, col] + res).max()) <= lo
    # the held-out split is drawn from its own stream: not the training positions shifted
    assert not torch.equal(ltr, lte)


def test_cache_is_reused_and_rebuilt(tmp_path, monkeypatch, capsys):
    ds = D.PhotoCropsDataset(str(tmp_path), "train", 16, N, seed=1)
    path = ds.cache_path
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "photos"))
    assert os.path.basename(path).startswith(f"photos-train-16px-down4-n{N}-seed1-")
    real = D.make_photo_crops
    monkeypatch.setattr(D, "make_photo_crops", lambda *a, **k: pytest.fail("the cache was not used"))
    cached = D.PhotoCropsDataset(str(tmp_path), "train", 16, N, seed=1)
    assert torch.equal(cached.images, ds.images) and torch.equal(cached.boxes, ds.boxes)
    # every parameter is part of the key: another value is another file (built, not read)
    keys = {D.photo_cache_key(*args) for args in [("train", 16, 4.0, N, 1), ("test", 16, 4.0, N, 1),
                                                  ("train", 32, 4.0, N, 1), ("train", 16, 2.0, N, 1),
                                                  ("train", 16, 4.0, N + 1, 1), ("train", 16, 4.0, N, 2)]}
    assert len(keys) == 6
    monkeypatch.setattr(D, "make_photo_crops", real)
    os.remove(path)  # missing: rebuilt, identical
    rebuilt = D.PhotoCropsDataset(str(tmp_path), "train", 16, N, seed=1)
    assert torch.equal(rebuilt.images, ds.images) and os.path.isfile(path)
    with open(path, "wb") as f:  # truncated / corrupt: rebuilt with a message
        f.write(b"not a torch file")
    capsys.readouterr()
    again = D.PhotoCropsDataset(str(tmp_path), "train", 16, N, seed=1)
    assert torch.equal(again.images, ds.images)
    out = capsys.readouterr().out
    assert "unreadable" in out and "rebuilding" in out


def test_dataset_items_labels_and_config(tmp_path):
    ds = D.get_dataset("photos", root=str(tmp_path), resolution=16, n=N, seed=0, conditional=True)
    assert (len(ds), ds.num_channels, ds.resolution, ds.label_dim) == (N, 3, 16, 14)
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and -1 <= float(x.min()) <= float(x.max()) <= 1
    assert int(y.argmax()) == int(ds.class_index[5]) and ds.class_names[int(ds.class_index[5])] in D.PHOTO_NAMES
    assert D.get_dataset("photos", root=str(tmp_path), resolution=16, n=N).label_dim == 0
    # through the run configuration (the same path `train` takes)
    from ayt.runs import build_dataset
    cfg = make_config(None, {"stage": "diffusion", "data.name": "photos", "data.root": str(tmp_path), "data.resolution": 16,
                             "data.num_images": N, "data.split": "test"})
    test = build_dataset(cfg)
    assert test.split == "test" and len(test) == N
    assert DataConfig().photo_downscale == D.PHOTO_DOWNSCALE


def test_bad_photo_settings_are_refused_with_the_setting_named(tmp_path):
    with pytest.raises(ConfigError, match="data.resolution=4.*photos"):
        make_config(None, {"stage": "diffusion", "data.name": "photos", "data.resolution": 4})
    with pytest.raises(ConfigError, match="data.photo_downscale=0.5"):
        make_config(None, {"stage": "diffusion", "data.name": "photos", "data.photo_downscale": 0.5})
    with pytest.raises(ConfigError, match="data.split"):
        make_config(None, {"stage": "diffusion", "data.name": "photos", "data.split": "val"})
    with pytest.raises(ValueError, match=r"too small for 64 px crops.*data.photo_downscale=4 \(.*chelsea is 75x113.*text is 43x112\); lower data.photo_downscale \(to at most about 2.6\)"):
        D.get_dataset("photos", root=str(tmp_path), resolution=64, n=N)
    assert len(D.get_dataset("photos", root=str(tmp_path), resolution=64, n=N, downscale=2.6)) == N  # as advised
    assert not (tmp_path / "photos" / (D.photo_cache_key("train", 64, 4.0, N, 0) + ".pt")).exists()

