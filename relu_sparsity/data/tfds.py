"""The TFDS source: a TensorFlow Datasets dataset already prepared on local disk, read through
seqio, offline.

`TfdsSource` follows the corpus protocol (data/corpus.py): `describe()`, `fingerprint()` and
`documents(split=None)`. Its split's examples are the train documents and its eval split's the
eval documents, each in the dataset's fixed order. Everything the constructor checks (the dataset,
its version, both splits, the text feature) comes from the JSON files TFDS writes beside the
records, so a wrong name or path fails at once, in one line, before TensorFlow is imported;
seqio and TensorFlow are imported only when documents are read. Nothing is ever downloaded: the
dataset is opened read-only from `data_dir` (TFDS's GCS access is off), never built or fetched.
"""

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterator

from relu_sparsity.data.corpus import Document

LAYOUT = "<data_dir>/<name>[/<config>]/<version>/dataset_info.json"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def split_name(name: str) -> tuple[str, str | None]:
    """('c4/en', '3.1.0') for 'c4/en:3.1.0'; ('tiny_text', None) for 'tiny_text'."""
    dataset, _, version = name.partition(":")
    if not dataset or dataset.startswith("/") or dataset.endswith("/") or ":" in version:
        raise ValueError(f"TFDS name {name!r} is not of the form NAME[/CONFIG][:X.Y.Z]")
    if version and not _VERSION.match(version):
        raise ValueError(f"TFDS name {name!r}: the version {version!r} is not X.Y.Z")
    return dataset, version or None


def _versions(folder: pathlib.Path) -> list[str]:
    """The prepared versions under a dataset (or config) folder, oldest first."""
    found = [entry.name for entry in folder.iterdir()
             if _VERSION.match(entry.name) and (entry / "dataset_info.json").is_file()]
    return sorted(found, key=_version_key)


def find_dataset(name: str, data_dir: pathlib.Path) -> tuple[pathlib.Path, str]:
    """The folder holding `name`'s dataset_info.json under `data_dir`, and its version (the newest
    there when `name` gives none)."""
    dataset, version = split_name(name)
    folder = data_dir / dataset
    if version is None and folder.is_dir():
        versions = _versions(folder)
        if versions:
            version = versions[-1]
        else:
            configs = sorted(entry.name for entry in folder.iterdir()
                             if entry.is_dir() and _versions(entry))
            if configs:
                raise ValueError(
                    f"TFDS dataset {name!r} in {data_dir} has configs ({', '.join(configs)}): "
                    f"name one, e.g. '{dataset}/{configs[0]}'")
    where = folder / (version or "<version>") / "dataset_info.json"
    if version is None or not where.is_file():
        present = f" (versions there: {', '.join(_versions(folder))})" if (
            version and folder.is_dir() and _versions(folder)) else ""
        raise FileNotFoundError(
            f"TFDS dataset {name!r} not found: no {where}{present}; TFDS lays a prepared dataset "
            f"out as {LAYOUT} beside its record files; prepare it there first (nothing is "
            "downloaded)")
    return where.parent, version


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def _features(folder: pathlib.Path, info: dict) -> dict:
    """The top-level features of a prepared dataset: features.json (beside dataset_info.json),
    else the `features` of dataset_info.json."""
    path = folder / "features.json"
    spec = _read_json(path) if path.is_file() else info.get("features", {})
    features = spec.get("featuresDict", {}).get("features")
    if features is None:
        raise ValueError(f"no features found in {path} nor in {folder / 'dataset_info.json'}")
    return features


def _is_text(feature: dict) -> bool:
    return ("text" in feature or feature.get("pythonClassName", "").endswith(".Text")
            or feature.get("tensor", {}).get("dtype") == "string")


def _examples(split_info: dict) -> int:
    """A split's example count: its shard lengths (or, where a dataset_info.json has none, its
    statistics)."""
    if "shardLengths" in split_info:
        return sum(int(length) for length in split_info["shardLengths"])
    return int(split_info.get("statistics", {}).get("numExamples", 0))


def _import_tensorflow():
    """seqio and TensorFlow, imported on first use (quiet: TensorFlow's C++ notices are off
    unless TF_CPP_MIN_LOG_LEVEL says otherwise), with TFDS's GCS access off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import seqio
        import tensorflow as tf
        from tensorflow_datasets.core.utils import gcs_utils
    except ImportError as err:
        raise ImportError(f"reading a TFDS dataset needs seqio, TensorFlow and TFDS ({err}): "
                          "install the seqio extra, pip install -e '.[seqio]'") from None

    gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
    return seqio, tf


class TfdsSource:
    """A prepared TFDS dataset under `data_dir`: `split`'s examples are the train documents,
    `eval_split`'s the eval documents, `text_key` their text."""
    kind = "tfds"

    def __init__(self, name: str, data_dir: str | os.PathLike, *, text_key: str = "text",
                 split: str = "train", eval_split: str = "validation"):
        raw_dir = os.fspath(data_dir)
        if "://" in raw_dir:
            raise ValueError(f"TFDS data_dir {raw_dir!r} is not a local folder; TfdsSource reads "
                             "a dataset already on disk and downloads nothing")
        self.data_dir = pathlib.Path(raw_dir).expanduser().resolve()
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"TFDS data_dir {self.data_dir} does not exist; it should hold the dataset as "
                f"{LAYOUT} (nothing is downloaded)")
        if split == eval_split:
            raise ValueError(f"the train and eval splits are both {split!r}; give two splits")
        self.folder, self.version = find_dataset(name, self.data_dir)
        self.dataset = split_name(name)[0]
        self.name = f"{self.dataset}:{self.version}"
        self.text_key, self.split, self.eval_split = text_key, split, eval_split
        info_path = self.folder / "dataset_info.json"
        self.info = _read_json(info_path)
        splits = {entry["name"]: entry for entry in self.info.get("splits", [])}
        self.examples = {}
        for role, tfds_split in (("train", split), ("eval", eval_split)):
            if tfds_split not in splits:
                raise ValueError(
                    f"TFDS dataset {self.name} has no split {tfds_split!r} (splits: "
                    f"{', '.join(sorted(splits)) or 'none'}) in {info_path}")
            count = _examples(splits[tfds_split])
            if count == 0:
                raise ValueError(f"split {tfds_split!r} of TFDS dataset {self.name} is empty "
                                 f"(no examples in {info_path})")
            self.examples[role] = count
        self.split_info = {role: splits[tfds_split] for role, tfds_split in self.splits.items()}
        features = _features(self.folder, self.info)
        if text_key not in features:
            raise ValueError(f"TFDS dataset {self.name} has no feature {text_key!r} (features: "
                             f"{', '.join(sorted(features))}) in {self.folder}")
        if not _is_text(features[text_key]):
            raise ValueError(f"feature {text_key!r} of TFDS dataset {self.name} is not text "
                             f"({json.dumps(features[text_key], sort_keys=True)})")

    @property
    def splits(self) -> dict[str, str]:
        """The TFDS split of each corpus split."""
        return {"train": self.split, "eval": self.eval_split}

    def describe(self) -> dict:
        return {"source": self.kind, "tfds": self.name, "data_dir": str(self.data_dir),
                "splits": self.splits, "text_key": self.text_key, "examples": dict(self.examples)}

    def fingerprint(self) -> str:
        """sha256 of the name, version, splits, text key and each split's shard lengths and
        bytes as dataset_info.json records them: the content, identified without reading it."""
        shards = {role: {"shard_lengths": [int(n) for n in info.get("shardLengths", [])],
                         "num_bytes": int(info.get("numBytes", 0))}
                  for role, info in self.split_info.items()}
        record = {"tfds": self.name, "version": self.version, "splits": self.splits,
                  "text_key": self.text_key, "shards": shards}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def documents(self, split: str | None = None) -> Iterator[Document]:
        """Every example of the train split, then every example of the eval split (only
        `split`'s, "train" or "eval", when given), in the dataset's order, streamed."""
        if split not in (None, "train", "eval"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")
        seqio, tf = _import_tensorflow()
        source = seqio.TfdsDataSource(tfds_name=self.name, tfds_data_dir=str(self.data_dir),
                                      splits=self.splits, read_only=True)
        for role, tfds_split in self.splits.items():
            if split is not None and role != split:
                continue
            dataset = source.get_dataset(role, shuffle=False)
            texts = dataset.map(lambda example: example[self.text_key]).prefetch(tf.data.AUTOTUNE)
            for index, text in enumerate(texts.as_numpy_iterator()):
                yield Document(role, f"{tfds_split}/{index:09d}", text.decode("utf-8"))

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {str(self.data_dir)!r}, splits={self.splits})"
