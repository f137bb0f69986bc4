"""Where images come from: `folder:` and `tfds:` sources, listed at start-up, never read then.

Sources are strings:
  * ``"tfds:NAME"``: any TFDS image dataset; NAME goes to ``tfds.builder`` as is, so it may carry
    a config and version (``"tfds:cifar100"``, ``"tfds:imagenet2012:5.1.0"``). ``split`` uses
    TFDS split syntax (``"train[:90%]"``). Labels come from its ``label`` ClassLabel feature.
  * ``"folder:PATH"``: torchvision's ImageFolder layout, ``PATH/<class>/**/<image>``: classes are
    the sub-folder names, sorted; files are sorted, at any depth. Images lying directly in PATH
    have no class and are used by pretraining only, so a flat folder of images is a valid
    pretraining source. When PATH has ``train/`` or ``val/`` sub-folders (the ImageNet layout
    ``PATH/train/<class>/*.JPEG``, ``PATH/val/<class>/*.JPEG``), ``split`` picks one: "train"
    -> PATH/train, "validation" or "val" -> PATH/val (or PATH/validation), "test" -> PATH/test.
    Otherwise PATH is the one split, "train".

Start-up lists the tree once, O(files) (``os.walk`` over ``os.scandir``; no ``stat``, no file
opened): an undecodable file is found when the pipeline decodes it. Every process lists the
same sorted tree (the global count agrees without communication) and keeps its shard's paths.
"""

import contextlib
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import NamedTuple

import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.core.errors import BadDataError, DataUnavailableError
from mae_jax.data import tf_runtime
from mae_jax.data.folders import (  # noqa: F401 - sources.list_folder etc. as before
    IMAGE_EXTENSIONS,
    FolderListing,
    class_folders,
    folder_paths_at,
    list_folder,
    split_folder,
)
from mae_jax.data.preparing import refuse_to_prepare

_SOURCE_FORMS = '"tfds:NAME" (e.g. "tfds:cifar100") or "folder:/path/to/images"'
_PROBE_HOSTS = ("storage.googleapis.com",)  # TFDS's bucket, besides each dataset's homepage
_PROBE_TIMEOUT_S = 3.0


class Source(NamedTuple):
    kind: str  # "tfds" or "folder"
    name: str  # TFDS name (with optional /config:version) or folder path


def parse_source(source: str) -> Source:
    """Parses "tfds:NAME" or "folder:PATH"; anything else raises ValueError."""
    kind, sep, name = source.partition(":") if isinstance(source, str) else ("", "", "")
    if not sep or kind not in ("tfds", "folder") or not name.strip():
        raise BadDataError(f"bad data source {source!r}: expected {_SOURCE_FORMS}")
    return Source(kind, name.strip())


# ------------------------------------------------------------------ TFDS source


def _how_to(name: str) -> str:
    return (f"On a machine with internet run `tfds build {name.split(':')[0]} --data_dir DIR`, "
            "copy DIR to this machine and pass --config.data.data_dir=DIR.")


def _reachable(hosts, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to any host (or to the HTTPS proxy) opens within timeout_s."""
    proxy = urllib.request.getproxies().get("https")
    if proxy:
        parsed = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        targets = [(parsed.hostname, parsed.port or 80)]
    else:
        targets = [(host, 443) for host in hosts if host]
    opened = []

    def probe(target):
        with contextlib.suppress(OSError):
            socket.create_connection(target, timeout=timeout_s).close()
            opened.append(target)

    # In parallel, as daemons: a DNS lookup that hangs (no timeout applies to it) is abandoned.
    threads = [threading.Thread(target=probe, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return bool(opened)


@contextlib.contextmanager
def _download_retries(retries: int | None):
    """TFDS retries each URL 10 times with exponential backoff (~200 s per URL offline);
    `retries` replaces that count while a dataset prepares (None: TFDS's own)."""
    from tensorflow_datasets.core.download import downloader

    if retries is None or not hasattr(downloader, "MAX_RETRIES"):
        yield
        return
    saved, downloader.MAX_RETRIES = downloader.MAX_RETRIES, retries
    try:
        yield
    finally:
        downloader.MAX_RETRIES = saved


def tfds_builder(name: str, data_dir: str | None, download: bool):
    """A prepared TFDS builder; prepares it (downloads) when allowed. Without network,
    preparing still runs (datasets built from manual_dir files need none) but with no download
    retries: a dataset that must be downloaded fails in seconds, not after TFDS's ~200 s."""
    with tf_runtime.no_tfds_scratch():
        builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    where = builder.data_dir
    refuse_to_prepare(name, where, download=download, how_to=_how_to(name))
    hosts = (urllib.parse.urlparse(builder.info.homepage or "").hostname, *_PROBE_HOSTS)
    offline = not _reachable(hosts)
    try:
        with _download_retries(0 if offline else None):
            builder.download_and_prepare()
    except Exception as error:
        why = (f"no network ({', '.join(h for h in hosts if h)} unreachable within "
               f"{_PROBE_TIMEOUT_S:g} s); " if offline else "")
        raise DataUnavailableError(f"could not download/prepare TFDS dataset {name!r} into "
                                   f"{where}: {why}{error}. {_how_to(name)}") from error
    return builder


def image_key(builder) -> str:
    features = builder.info.features
    if "image" in features:
        return "image"
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            return key
    raise BadDataError(f"TFDS dataset {builder.name!r} has no image feature: {list(features)}")


def _label_or_none(builder):
    features = builder.info.features
    feature = features["label"] if "label" in features else None
    return feature if isinstance(feature, tfds.features.ClassLabel) else None


def label_feature(builder):
    feature = _label_or_none(builder)
    if feature is None:
        raise BadDataError(f"TFDS dataset {builder.name!r} has no 'label' ClassLabel feature "
                           f"({list(builder.info.features)}): it cannot serve labelled training")
    return feature


def tfds_records(builder, split) -> tf.data.Dataset:
    """{"encoded": image bytes, "label": int32 (-1 if none), "name": record id} of `split`, in
    a fixed order; decoding happens later, in parallel."""
    key = image_key(builder)
    labelled = _label_or_none(builder) is not None
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={key: tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(add_tfds_id=True))
    what = f"tfds:{builder.name} {split}"
    return ds.map(lambda example: {
        "encoded": example[key],
        "label": tf.cast(example["label"], tf.int32) if labelled else tf.constant(-1),
        "name": example.get("tfds_id", tf.constant(what)),
    })


def tfds_count(builder, split) -> int:
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError):  # e.g. tfds.testing.mock_data: no split metadata
        return int(builder.as_dataset(split=split).cardinality())


# ------------------------------------------------------------ Per-process shards


class Shard(NamedTuple):
    """This process's part of a split, in a fixed order, cheap to shuffle and skip."""

    records: tf.data.Dataset  # folder: int64 indices into `paths`; TFDS: tfds_records dicts
    count: int  # records in this shard
    total: int  # records in the whole split (all processes)
    paths: tf.Tensor | None  # folder: [count] string paths (random access for replacements)
    labels: tf.Tensor | None  # folder: [count] int32 labels (-1: none)
    what: str  # names the data in messages


def local_shard(source: str, split: str, *, data_dir, download, process_index: int,
                process_count: int, with_labels: bool, equal: bool) -> Shard:
    """Records of `split` for one process. equal=True (training): every shard has
    total // process_count records (the rest is dropped), so all processes run the same steps;
    equal=False (evaluation): shards of sizes differing by at most one cover the whole split."""
    kind, name = parse_source(source)
    what = f"{source} split {split!r}"
    if kind == "folder":
        listing = list_folder(split_folder(name, split), with_labels=with_labels,
                              shard_index=process_index, shard_count=process_count)
        count = listing.total // process_count if equal else len(listing.paths)
        paths = tf.constant(list(listing.paths[:count]), tf.string)
        labels = tf.constant(list(listing.labels[:count]), tf.int32)
        records = tf.data.Dataset.range(count)
        return Shard(records, count, listing.total, paths, labels, what)
    builder = tfds_builder(name, data_dir, download)
    if with_labels:
        label_feature(builder)
    local_split = tfds.even_splits(split, n=process_count, drop_remainder=equal)[process_index]
    records = tfds_records(builder, local_split)
    return Shard(records, tfds_count(builder, local_split), tfds_count(builder, split), None,
                 None, what)


def _default_process() -> tuple[int, int]:
    import jax  # lazily: only the defaults need it
    return jax.process_index(), jax.process_count()


def num_examples(*, source: str, data_dir: str | None = None, split: str = "train",
                 download: bool = True, with_labels: bool = False) -> int:
    """Examples in the whole split (all processes): listed files for folders (with_labels:
    only those in class folders), the split size for TFDS (prepared first when allowed)."""
    kind, name = parse_source(source)
    if kind == "folder":
        index, count = _default_process()  # lists this process's shard: what its pipeline uses
        return list_folder(split_folder(name, split), with_labels=with_labels,
                           shard_index=index, shard_count=count).total
    return tfds_count(tfds_builder(name, data_dir, download), split)


def class_names(*, source: str, data_dir: str | None = None, split: str = "train",
                download: bool = True) -> list[str]:
    """Class names in label order: sorted class folders, or the TFDS `label` feature's names."""
    kind, name = parse_source(source)
    if kind == "folder":
        directory = split_folder(name, split)
        classes = class_folders(directory)
        if not classes:
            raise BadDataError(f"folder {directory!r} has no class sub-folders: labelled data "
                               "needs PATH/<class>/<image> (torchvision's ImageFolder layout)")
        return classes
    return list(label_feature(tfds_builder(name, data_dir, download)).names)


def num_classes(*, source: str, data_dir: str | None = None, split: str = "train",
                download: bool = True) -> int:
    return len(class_names(source=source, data_dir=data_dir, split=split, download=download))
