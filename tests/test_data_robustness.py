"""Broken data never breaks a run: undecodable files at decode time, TFDS without network."""

import logging
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax.core.errors import BadDataError
from mae_jax.data import images, sources
from mae_jax.data.constants import IMAGENET_MEAN_UINT8

SIZE = 16


@pytest.fixture()
def folder_with_bad_files(tmp_path):
    """7 good JPEGs (constant grey 30 * i + 20), the first third of a valid JPEG, and random
    bytes named .jpg."""
    for i in range(7):
        Image.new("RGB", (40 + i, 30), (30 * i + 20,) * 3).save(tmp_path / f"good{i}.jpg")
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "whole.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "random.jpg").write_bytes(rng.bytes(3000))
    return tmp_path


def test_undecodable_files_keep_shapes_exact_resume_and_are_named_once(folder_with_bad_files,
                                                                       caplog):
    source = f"folder:{folder_with_bad_files}"
    assert images.num_examples(source=source) == 9  # listed files, the broken ones included
    common = dict(source=source, image_size=SIZE, global_batch_size=4, seed=1,
                  process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="mae_jax.data"):
        fresh_iterator = images.create_train_iterator(**common)
        fresh = [next(fresh_iterator)["image"] for _ in range(8)]  # about 3.5 epochs
    assert all(batch.shape == (4, SIZE, SIZE, 3) for batch in fresh)
    for name in ("random.jpg", "truncated.jpg"):
        named = [r for r in caplog.records if name in r.getMessage()]
        assert len(named) == 1, name  # once per file, though every epoch meets it
    assert {os.path.basename(p) for p in fresh_iterator.undecodable} == {"random.jpg",
                                                                         "truncated.jpg"}
    resumed = images.create_train_iterator(start_step=5, **common)  # mid-way through epoch 3
    for expected in fresh[5:]:
        np.testing.assert_array_equal(next(resumed)["image"], expected)


def test_a_block_where_nothing_decodes_gives_the_mean_colour_and_says_so(tmp_path, caplog):
    """Every record of every decoding block fails (the path where a block has no image at all):
    batches keep their shape, each slot is the mean colour, and the log says to check the data."""
    rng = np.random.default_rng(1)
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(rng.bytes(500))
    with caplog.at_level(logging.WARNING, logger="mae_jax.data"):
        batches = images.create_train_iterator(
            source=f"folder:{tmp_path}", image_size=SIZE, global_batch_size=2, seed=0,
            process_index=0, process_count=1)
        batch = next(batches)["image"]
        for _ in range(3):
            next(batches)
    assert batch.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(batch, np.broadcast_to(IMAGENET_MEAN_UINT8, batch.shape))
    assert "Check the data" in caplog.text and len(batches.undecodable) == 3
    assert caplog.text.count("None of 10 files tried") == 1  # QA: a line an example, 1,600
    # The fixed pictures: one clear error, no traceback (QA: a plain ValueError).
    with pytest.raises(BadDataError, match=r"None of \[.*bad0.jpg.*\] decodes .*check the data"):
        images.load_fixed_images(source=f"folder:{tmp_path}", image_size=SIZE, count=2)


def test_pictures_and_evaluation_skip_undecodable_files(folder_with_bad_files, caplog):
    source = f"folder:{folder_with_bad_files}"
    with caplog.at_level(logging.WARNING, logger="mae_jax.data"):
        pictures = images.load_fixed_images(source=source, image_size=SIZE, count=9)
    assert pictures.shape == (9, SIZE, SIZE, 3)
    # Sorted listing: good0..good6, random, truncated; the last two take the next good image.
    greys = np.round(pictures.reshape(9, -1).mean(axis=1)).astype(int)
    np.testing.assert_allclose(greys, [20, 50, 80, 110, 140, 170, 200, 20, 20], atol=1)
    assert "random.jpg" in caplog.text and "truncated.jpg" in caplog.text
    labelled = folder_with_bad_files / "labelled" / "val" / "only_class"
    labelled.mkdir(parents=True)
    for path in folder_with_bad_files.glob("*.jpg"):
        path.rename(labelled / path.name)
    (folder_with_bad_files / "labelled" / "train").mkdir()
    iterator = images.create_eval_iterator(
        source=f"folder:{folder_with_bad_files / 'labelled'}", image_size=SIZE,
        global_batch_size=4, split="val", process_index=0, process_count=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_jax.data"):
        batches = list(iterator)
    assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 7
    assert len(iterator.undecodable) == 2
    assert "random.jpg" in caplog.text and "left out of the metrics" in caplog.text
    assert "filled" not in caplog.text  # evaluation fills nothing: the log says what it does


class MaeJaxOnlineOnly(tfds.core.GeneratorBasedBuilder):
    """A dataset that must be downloaded (from a host that never resolves)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, homepage="https://mae-jax-test.invalid/",
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(4, 4, 3))}))

    def _split_generators(self, dl_manager):
        dl_manager.download("https://mae-jax-test.invalid/data.tar.gz")
        raise AssertionError("the download cannot have succeeded")

    def _generate_examples(self):
        yield from ()


def test_offline_tfds_download_fails_in_seconds_with_the_offline_recipe(tmp_path, monkeypatch):
    probed = []
    monkeypatch.setattr(sources, "_reachable", lambda hosts: probed.append(hosts) or False)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no network.*tfds build mae_jax_online_only"):
        images.num_examples(source="tfds:mae_jax_online_only", data_dir=str(tmp_path))
    # TFDS alone retries ~200 s with backoff; without retries the unresolvable host fails now.
    assert time.monotonic() - started < 20
    assert "mae-jax-test.invalid" in probed[0]
    from tensorflow_datasets.core.download import downloader

    assert downloader.MAX_RETRIES == 10  # TFDS's own setting is restored afterwards


def test_reachability_probe_gives_up_within_its_timeout(monkeypatch):
    assert not sources._reachable(["mae-jax-test.invalid"], timeout_s=0.5)  # never resolves

    def hanging_lookup(address, timeout=None):
        time.sleep(5)  # a DNS lookup stuck past any socket timeout
        raise OSError("gave up")

    monkeypatch.setattr(sources.socket, "create_connection", hanging_lookup)
    started = time.monotonic()
    assert not sources._reachable(["example.org", "example.com"], timeout_s=0.5)
    assert time.monotonic() - started < 1.5
