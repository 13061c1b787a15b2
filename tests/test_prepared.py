import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from ddpm import prepared
from ddpm.data import DataError, PreparedImages, load_dataset
from ddpm.files import to_uint8
from ddpm.prepared import prepare_dataset
from helpers import write_fake_cifar, write_mixed_folder, write_with_bad_files


def prepare_cli(argv: list[str]) -> int:
    """`ddpm prepare ...` through the package's command line."""
    from ddpm import cli

    return cli.main(["prepare", *argv])


def assert_same_items(source, copy) -> None:
    """Every item of the prepared copy equals the source's, quantised to uint8: to the pixel, labels too."""
    assert len(copy.dataset) == len(source.dataset)
    for i in range(len(source.dataset)):
        (x, y), (x_copy, y_copy) = source.dataset[i], copy.dataset[i]
        assert x_copy.dtype == torch.float32 and x_copy.shape == x.shape
        assert torch.equal(to_uint8(x_copy), to_uint8(x)) and int(y_copy) == int(y), i
        assert torch.equal(x_copy, (to_uint8(x).float() / 255) * 2 - 1)  # the same float values a folder item has
    assert copy.class_names == source.class_names and copy.num_classes == source.num_classes


@pytest.mark.parametrize("channels", [1, 3])
def test_a_prepared_folder_equals_the_source_to_the_pixel(tmp_path, monkeypatch, channels):
    # bugs caught: a row or shard off by one (shards of two images here), labels shifted, truncation instead of
    # rounding, a channel count or class list lost on the way
    monkeypatch.setattr(prepared, "SHARD_BYTES", 2 * channels * 16 * 16)
    write_mixed_folder(tmp_path / "src")
    assert prepare_cli([str(tmp_path / "src"), "--image-size", "16", "--channels", str(channels), "--conditional",
                        "--out", str(tmp_path / "prep"), "--quiet", "--num-workers", "0"]) == 0
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert (meta["format"], meta["version"], meta["image_size"], meta["channels"], meta["count"]) == (
        "ddpm-prepared", 1, 16, channels, 5)
    assert meta["source"] == str((tmp_path / "src").resolve())
    assert meta["splits"]["train"]["shards"][-1] == "train-images-00002.npy"
    shard = np.load(tmp_path / "prep" / "train-images-00000.npy", mmap_mode="r")
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint8 and shard.shape == (2, channels, 16, 16)
    source = load_dataset(str(tmp_path / "src"), 16, channels, conditional=True)
    copy = load_dataset(str(tmp_path / "prep"), 16, channels, conditional=True)
    assert isinstance(copy.dataset, PreparedImages) and copy.channels == channels
    assert_same_items(source, copy)
    assert load_dataset(str(tmp_path / "prep"), 16).num_classes is None  # unconditional use of a labelled copy


def test_bundled_sets_and_cifar_keep_their_splits(tmp_path):
    # bugs caught: the held-out split lost (validation and evaluation need it) or mixed into training
    write_fake_cifar(tmp_path / "cifar")
    with open(tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.random.default_rng(3).integers(0, 256, (3, 3072), dtype=np.uint8),
                     "labels": [7, 8, 9]}, f)
    for data, size in (("mnist", 8), ("photos", 8), (str(tmp_path / "cifar"), 16)):
        out = prepare_dataset(data, size, tmp_path / f"prep-{size}-{len(data)}", progress=False)
        conditional = data != "photos"
        splits = ("train",) if data == "photos" else ("train", "holdout")
        sources = [load_dataset(data, size, conditional=conditional, split=split) for split in splits]
        for split, source in zip(splits, sources):
            assert_same_items(source, load_dataset(str(out), size, conditional=conditional, split=split))
        # 'all' of a prepared copy: train then holdout (mnist's own 'all' interleaves them)
        everything = dataclasses.replace(sources[0], dataset=ConcatDataset([s.dataset for s in sources]))
        assert_same_items(everything, load_dataset(str(out), size, conditional=conditional, split="all"))
        if data == "photos":
            with pytest.raises(DataError, match="no held-out split"):
                load_dataset(str(out), size, split="holdout")


def test_mismatches_and_output_folders_are_clear_errors(tmp_path):
    # bugs caught: training at another size than prepared (silently wrong images), overwriting a user's folder,
    # shards of an earlier, larger preparation left behind
    write_mixed_folder(tmp_path / "src")
    out = prepare_dataset(str(tmp_path / "src"), 16, tmp_path / "prep", progress=False, num_workers=0)
    with pytest.raises(DataError, match="prepared at 16x16 pixels, not 32; use --image-size 16"):
        load_dataset(str(out), 32)
    with pytest.raises(DataError, match="with 3 channel.*not 1; use --channels 3"):
        load_dataset(str(out), 16, channels=1)
    with pytest.raises(DataError, match="prepared without them.*--conditional --out NEW_DIR"):
        load_dataset(str(out), 16, conditional=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="already holds other files"):
        prepare_dataset(str(tmp_path / "src"), 16, tmp_path / "mine", progress=False)
    (out / "train-images-00007.npy").write_bytes(b"stale")
    prepare_dataset(str(tmp_path / "src"), 8, out, progress=False, num_workers=0)  # replaces the copy
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train-images-00000.npy", "train-labels.npy"]
    assert load_dataset(str(out), 8).dataset[0][0].shape == (3, 8, 8)


def test_unreadable_files_are_left_out_and_listed(tmp_path, capsys):
    # bugs caught: a bad file stopping the preparation, or its place silently filled by a duplicate
    write_with_bad_files(tmp_path / "src")
    assert prepare_cli([str(tmp_path / "src"), "--image-size", "8", "--channels", "1", "--conditional",
                        "--out", str(tmp_path / "prep"), "--quiet", "--num-workers", "2"]) == 0
    assert "left out 3 unreadable file(s)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in meta["splits"]["train"]["skipped"]] == ["1.png", "2.jpg", "4.png"]
    copy = load_dataset(str(tmp_path / "prep"), 8, conditional=True)
    items = (copy.dataset[i] for i in range(len(copy.dataset)))
    assert [(to_uint8(x).unique().item(), y) for x, y in items] == [(10, 0), (200, 1)]


def test_a_prepared_set_travels_to_workers_without_its_pixels(tmp_path):
    # bug caught: pickling the memory-mapped arrays (a copy of the whole set per worker, or a spawn failure)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "b.png")
    out = prepare_dataset(str(tmp_path), 8, tmp_path / "prep", progress=False, num_workers=0)
    dataset = load_dataset(str(out), 8).dataset
    dataset[0]  # maps the shards in this process
    assert b"\xff" * 64 not in pickle.dumps(dataset)
    images, labels = next(iter(DataLoader(dataset, batch_size=2, num_workers=2)))
    assert images[:, 0, 0, 0].tolist() == [-1.0, 1.0] and labels.tolist() == [-1, -1]
