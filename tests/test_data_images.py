"""Tests for the MAE pretraining input pipeline: mock or locally generated data, no downloads."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax.data import images
from mae_jax.data.constants import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize

SIZE = 32
LOW = min((0.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
HIGH = max((1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))


class MaeJaxTinyGray(tfds.core.GeneratorBasedBuilder):
    """20 train / 4 test grayscale images; image i is constant with value 10 * i + 5."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 1))})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20), "test": self._generate_examples(4)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"image": np.full((8 + i % 3, 10, 1), 10 * i + 5, np.uint8)}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    MaeJaxTinyGray(data_dir=data_dir).download_and_prepare(download_config=config)
    return data_dir


def _write_folder(root, count=9):
    """Nested JPEG/PNG files of different sizes and modes, constant grey value 20 * i + 10."""
    modes = [("RGB", ".jpg"), ("L", ".JPEG"), ("RGBA", ".png"), ("L", ".png"), ("RGB", ".PNG")]
    for i in range(count):
        mode, ext = modes[i % len(modes)]
        value = 20 * i + 10
        color = {"RGB": (value,) * 3, "L": value, "RGBA": (value, value, value, 128)}[mode]
        folder = root / f"class{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (12 + 3 * i, 9 + 2 * i), color).save(folder / f"img{i}{ext}", quality=100)
    (root / "class0" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (root / "notes.txt").write_text("not an image, ignored")
    return f"folder:{root}"


def _take(iterator, count):
    return [next(iterator)["image"] for _ in range(count)]


def _grey_ids(images, spacing, offset):
    """Recovers which constant-grey source image each (un-augmented) output came from."""
    values = denormalize(images).mean(axis=(1, 2, 3)) * 255
    return sorted(int(round((v - offset) / spacing)) for v in values)


def test_parse_source_accepts_both_forms_and_rejects_others():
    assert images.parse_source("tfds:cifar100") == ("tfds", "cifar100")
    assert images.parse_source("folder:/data/imgs") == ("folder", "/data/imgs")
    for bad in ["cifar100", "tfds:", "hdf5:/x", "", "folder: "]:
        with pytest.raises(ValueError, match="tfds:NAME.*folder:"):
            images.parse_source(bad)


def test_normalize_and_denormalize_are_inverse():
    images = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(denormalize(normalize(images)), images, atol=1e-6)
    with pytest.raises(ValueError, match="channels-last"):
        normalize(np.zeros((2, 3, 4, 4)))


def test_tfds_batches_are_normalised_deterministic_and_seed_dependent():
    common = dict(source="tfds:cifar100", image_size=SIZE, global_batch_size=4, process_count=1,
                  process_index=0)  # fmt: skip
    with tfds.testing.mock_data(num_examples=10):
        first = _take(images.create_pretrain_iterator(seed=0, **common), 3)
        again = _take(images.create_pretrain_iterator(seed=0, **common), 3)
        other = _take(images.create_pretrain_iterator(seed=1, **common), 3)
        fixed = images.load_fixed_images(source="tfds:cifar100", image_size=SIZE, count=3)
    assert first[0].shape == (4, SIZE, SIZE, 3) and first[0].dtype == np.float32
    assert all(LOW - 1e-4 <= b.min() and b.max() <= HIGH + 1e-4 for b in first)
    assert first[0].std() > 0.5  # real image content, not a constant
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], other[0])
    assert fixed.shape == (3, SIZE, SIZE, 3) and fixed.dtype == np.float32


def test_resume_from_step_matches_fresh_iterator_across_epoch_boundary(tmp_path):
    source = _write_folder(tmp_path)  # 9 readable images, batch 4 -> 2 steps per epoch
    common = dict(source=source, image_size=SIZE, global_batch_size=4, seed=3, process_count=1,
                  process_index=0)  # fmt: skip
    fresh = _take(images.create_pretrain_iterator(**common), 6)
    resumed = _take(images.create_pretrain_iterator(start_step=3, **common), 3)
    for a, b in zip(fresh[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each epoch is a new permutation and new augmentations, not a replay.
    assert not np.array_equal(fresh[0], fresh[2])


def test_folder_skips_and_counts_corrupt_files_and_converts_modes_to_rgb(tmp_path, caplog):
    source = _write_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        assert images.num_examples(source=source) == 9
    assert "Skipping 1 unreadable" in caplog.text and "broken.jpg" in caplog.text
    iterator = images.create_pretrain_iterator(
        source=source, image_size=SIZE, global_batch_size=8, seed=0, process_count=1,
        process_index=0, augment=False,
    )  # fmt: skip
    (batch,) = _take(iterator, 1)
    pixels = denormalize(batch) * 255
    # Grey sources (L, RGB, RGBA alike) come out as equal R, G, B at the source value.
    np.testing.assert_allclose(pixels, pixels[..., :1].repeat(3, -1), atol=1.5)
    assert len(set(_grey_ids(batch, spacing=20, offset=10))) == 8


def test_folder_shards_are_disjoint_and_equal_sized(tmp_path):
    source = _write_folder(tmp_path)
    ids = []
    for index in range(2):
        iterator = images.create_pretrain_iterator(
            source=source, image_size=SIZE, global_batch_size=8, seed=0, process_count=2,
            process_index=index, augment=False,
        )  # fmt: skip
        ids.append(_grey_ids(_take(iterator, 1)[0], spacing=20, offset=10))
    assert len(ids[0]) == len(ids[1]) == 4
    assert not set(ids[0]) & set(ids[1])


def test_tfds_process_shards_are_disjoint_and_grayscale_becomes_rgb(tiny_tfds_dir):
    shards = []
    for index in range(2):
        iterator = images.create_pretrain_iterator(
            source="tfds:mae_jax_tiny_gray", data_dir=tiny_tfds_dir, image_size=SIZE,
            global_batch_size=4, seed=0, process_count=2, process_index=index,
            download=False, augment=False,
        )  # fmt: skip
        batches = np.concatenate(_take(iterator, 5))  # one epoch: 10 examples per process
        shards.append(_grey_ids(batches, spacing=10, offset=5))
    assert sorted(shards[0] + shards[1]) == list(range(20))
    fixed = images.load_fixed_images(
        source="tfds:mae_jax_tiny_gray", data_dir=tiny_tfds_dir, image_size=SIZE, count=4
    )
    assert fixed.shape == (4, SIZE, SIZE, 3)
    assert _grey_ids(fixed, spacing=10, offset=5) == [0, 1, 2, 3]  # the 4-image "test" split
    # Exact ImageNet normalisation of a constant grey image.
    value = (denormalize(fixed[:1]) * 255).mean()
    expected = (np.round(value) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(fixed[0, 5, 5], expected, atol=1e-3)
    count = images.num_examples(source="tfds:mae_jax_tiny_gray", data_dir=tiny_tfds_dir)
    assert count == 20


def test_random_resized_crop_boxes_stay_in_range_and_fall_back_to_center():
    for i in range(20):
        seed = tf.constant([i, 7], tf.int64)
        top, left, height, width = (int(v) for v in images._crop_box(seed, 48, 64))
        assert 0 <= top and top + height <= 48 and 0 <= left and left + width <= 64
        assert 0.18 <= height * width / (48 * 64) <= 1.0
        assert 0.7 <= width / height <= 1.4
    # No try fits a 4 x 100 strip: torchvision's center crop with the ratio clamped to 4/3.
    box = images._crop_box(tf.constant([0, 0], tf.int64), 4, 100)
    assert [int(v) for v in box] == [0, 47, 4, 5]


def test_clear_errors_for_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no readable"):
        images.num_examples(source=f"folder:{empty}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.num_examples(source=f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="tfds:NAME"):
        images.create_pretrain_iterator(source="imagenet", image_size=SIZE, global_batch_size=4,
                                          seed=0, process_index=0, process_count=1)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar100"):
        images.create_pretrain_iterator(
            source="tfds:cifar100", data_dir=str(tmp_path / "tfds"), image_size=SIZE,
            global_batch_size=4, seed=0, process_index=0, process_count=1, download=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        images.create_pretrain_iterator(source=_write_folder(tmp_path / "f"), image_size=SIZE,
                                          global_batch_size=5, seed=0, process_index=0,
                                          process_count=2)  # fmt: skip


def test_failed_download_says_how_to_build_offline(tmp_path, monkeypatch):
    def no_network(self, dl_manager):
        raise ConnectionError("no internet")

    monkeypatch.setattr(MaeJaxTinyGray, "_split_generators", no_network)
    with pytest.raises(RuntimeError, match="tfds build mae_jax_tiny_gray --data_dir DIR"):
        images.num_examples(source="tfds:mae_jax_tiny_gray", data_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "mae_jax_tiny_gray" / "1.0.0" / "dataset_info.json")
