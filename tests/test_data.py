import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import DataError, load_dataset, to_uint8


def test_mnist_is_bundled_offline_with_labels():
    info = load_dataset("mnist", 16, conditional=True)
    assert len(info.dataset) == 4000 and info.channels == 1 and info.num_classes == 10
    images, labels = info.dataset.tensors
    assert images.shape == (4000, 1, 16, 16)
    assert images.min().item() == pytest.approx(-1.0) and images.max().item() <= 1.0 and images.max().item() > 0.5
    assert torch.equal(torch.bincount(labels), torch.full((10,), 400))
    held_images, held_labels = load_dataset("mnist", 16, split="holdout").dataset.tensors
    assert torch.equal(torch.bincount(held_labels), torch.full((10,), 100))
    # the held-out digits are none of the training digits
    train_rows = {tuple(r) for r in images.flatten(1).mul(127.5).round().int().tolist()}
    assert not any(tuple(r) in train_rows for r in held_images.flatten(1).mul(127.5).round().int().tolist())
    everything = load_dataset("mnist", 16, split="all").dataset.tensors[1]
    assert len(everything) == 5000
    padded = load_dataset("mnist", 32).dataset.tensors[0]
    assert padded.shape == (4000, 1, 32, 32)
    assert padded[:, :, :2].max().item() == -1.0  # padding is background, digits keep their scale


def test_photos_are_bundled_offline_and_unlabelled():
    info = load_dataset("photos", 16)
    images, labels = info.dataset.tensors
    assert images.shape[1:] == (3, 16, 16) and info.num_classes is None
    assert -1.0 <= images.min().item() and images.max().item() <= 1.0 and images.std().item() > 0.1
    with pytest.raises(DataError, match="--conditional"):
        load_dataset("photos", 16, conditional=True)


def write_mixed_folder(root):
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(np.full((20, 30), 200, np.uint8), "L").save(root / "cats" / "gray.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 10, 4), dtype=np.uint8), "RGBA").save(root / "cats" / "rgba.png")
    Image.fromarray(np.zeros((7, 7), np.uint8), "L").convert("P").save(root / "dogs" / "palette.gif")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "dogs" / "sixteen.png")
    Image.fromarray(np.zeros((100, 60, 3), np.uint8)).save(root / "dogs" / "big.jpg")
    (root / "dogs" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_modes_and_sizes_load(tmp_path, channels):
    write_mixed_folder(tmp_path)
    info = load_dataset(str(tmp_path), 16, channels=channels, conditional=True)
    assert len(info.dataset) == 5 and info.num_classes == 2 and info.class_names == ["cats", "dogs"]
    items = [info.dataset[i] for i in range(5)]
    assert all(x.shape == (channels, 16, 16) for x, _ in items)
    assert sorted(y for _, y in items) == [0, 0, 1, 1, 1]
    assert all(-1.0 <= x.min() and x.max() <= 1.0 for x, _ in items)
    # 16-bit value 40000 ~ 156/255 after scaling, not saturated
    sixteen = [x for (x, _), (p, _) in zip(items, info.dataset.samples) if p.name == "sixteen.png"][0]
    assert sixteen.mean().item() == pytest.approx(156 / 127.5 - 1, abs=0.02)
    flat = load_dataset(str(tmp_path), 16)  # unconditional: every image under the folder, no labels
    assert len(flat.dataset) == 5 and flat.num_classes is None


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_dataset(str(tmp_path), 16)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert len(load_dataset(str(tmp_path), 16).dataset) == 1
    with pytest.raises(DataError, match="subfolder per class"):
        load_dataset(str(tmp_path), 16, conditional=True)
    with pytest.raises(DataError, match="neither a bundled"):
        load_dataset(str(tmp_path / "missing"), 16)


def write_fake_cifar(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": [(b + i) % 10 for i in range(per_batch)]}
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    return folder, entry


def test_cifar10_python_batches_load(tmp_path):
    folder, last = write_fake_cifar(tmp_path)
    for path in (tmp_path, folder):  # the parent or the batches folder itself
        info = load_dataset(str(path), 32, conditional=True)
        images, labels = info.dataset.tensors
        assert images.shape == (20, 3, 32, 32) and info.num_classes == 10
        assert info.class_names[3] == "class3"
        assert labels[-4:].tolist() == last["labels"]
        # the batch rows are CHW planes: pixel (c=0, y=0, x=1) is element 1 of the row
        assert to_uint8(images[-4:])[0, 0, 0, 1].item() == last["data"][0, 1]
    assert load_dataset(str(tmp_path), 16).dataset.tensors[0].shape == (20, 3, 16, 16)


def test_holdout_splits(tmp_path):
    folder, _ = write_fake_cifar(tmp_path)
    with pytest.raises(DataError, match="no test_batch"):
        load_dataset(str(tmp_path), 32, split="holdout")
    rng = np.random.default_rng(1)
    test = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [7, 8, 9]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(test, f)
    held = load_dataset(str(tmp_path), 32, conditional=True, split="holdout")
    images, labels = held.dataset.tensors
    assert labels.tolist() == [7, 8, 9] and "test_batch" in held.description
    assert to_uint8(images)[2, 1, 0, 0].item() == test["data"][2, 1024]  # channel 1 starts at element 32*32
    assert len(load_dataset(str(tmp_path), 32, split="train").dataset) == 20
    assert len(load_dataset(str(tmp_path), 32, split="all").dataset) == 23
    # sets that keep nothing out of training say so instead of handing back the training images
    write_mixed_folder(tmp_path / "folder")
    for data in ("photos", str(tmp_path / "folder")):
        with pytest.raises(DataError, match="no held-out split"):
            load_dataset(data, 16, split="holdout")
