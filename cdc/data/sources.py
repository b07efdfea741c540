"""Source readers for `cdc prepare`: list what a source holds as a sorted, deterministic item list.

Three kinds of source:
- an ILSVRC2012 root (its `train/` or `val/` split, also under `Data/CLS-LOC/`); a flat `val/`
  is arranged by `LOC_val_solution.csv` when that file is present;
- any class-folder tree (classes = sorted folder names, names from a `LOC_synset_mapping.txt`
  beside it or one or two levels up);
- MNIST-format idx(.gz) image/label files (`*train-images-idx3-ubyte[.gz]`, `t10k-*` for the
  test split), including the bundled Fashion-MNIST subset (`fashion-mnist`).
Nothing here decodes images; that happens per shard in cdc.data.prepare.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass(frozen=True)
class Item:
    key: str  # webdataset __key__, unique, no dots
    cls: int  # class index
    ref: str | int  # file path relative to Source.root, or the idx record index


@dataclass
class Source:
    kind: str  # "imagenet" | "folder" | "idx"
    name: str  # short name for the default output folder
    ident: str  # what the manifest records as the source
    root: Path  # folder the item paths are relative to (idx: the folder with the idx files)
    split: str
    classes: list[str]
    class_names: list[str] | None
    items: list[Item]
    channels: int  # 3 for image trees (always converted to RGB), 1 for idx
    images: np.ndarray | None = field(default=None, repr=False)  # idx only: (N, H, W) uint8


def fingerprint(items: list[Item]) -> str:
    """sha256 over keys, classes and refs: a changed file list must not resume an old output."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\t{it.cls}\t{it.ref}\n".encode("utf-8", "surrogateescape"))  # names are bytes
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# idx (MNIST format)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read idx file ({e})") from None
    head = 4 + 4 * ndim
    if len(data) < head or struct.unpack(">I", data[:4])[0] != magic:
        raise ValueError(f"{path}: not an idx file with magic {magic:#06x} (uint8, {ndim}-d)")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    n = int(np.prod(dims))
    if len(data) - head < n:
        raise ValueError(f"{path}: truncated idx file ({len(data) - head} of {n} bytes); download it again")
    return np.frombuffer(data, np.uint8, count=n, offset=head).reshape(dims)


def _find_one(folder: Path, stem: str) -> Path | None:
    hits = sorted(p for p in folder.iterdir() if p.name.endswith((stem, stem + ".gz")))
    if len(hits) > 1:
        raise ValueError(f"{folder}: several files match *{stem}[.gz]: {[p.name for p in hits]}; keep one")
    return hits[0] if hits else None


def _idx_source(folder: Path, split: str, name: str, ident: str) -> Source:
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_one(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_one(folder, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        raise FileNotFoundError(
            f"{folder}: need {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
        )
    images = _read_idx(img_path, 0x803, 3)
    labels = _read_idx(lab_path, 0x801, 1)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    n_cls = int(labels.max()) + 1 if len(labels) else 0
    fashion = "fashion" in (name + ident).lower() and n_cls <= len(FASHION_NAMES)
    tag = "train" if split == "train" else "test"
    items = [Item(f"{tag}_{i:06d}", int(c), i) for i, c in enumerate(labels)]
    return Source(
        "idx",
        name,
        ident,
        folder,
        split,
        [str(i) for i in range(n_cls)],
        FASHION_NAMES[:n_cls] if fashion else None,
        items,
        1,
        images,
    )


# ---------------------------------------------------------------------------------------------
# class-folder trees


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _key(cls_name: str, rel: str, seen: set[str]) -> str:
    """A unique webdataset key without dots: ImageNet stems already start with the wnid."""
    stem, ext = os.path.splitext(rel)
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", stem)
    key = stem if stem.startswith(cls_name) else f"{re.sub(r'[^A-Za-z0-9_-]', '_', cls_name)}_{stem}"
    if key in seen:  # same stem with another extension
        key = f"{key}_{ext.lstrip('.').lower()}"
    i = 1
    while key in seen:
        key, i = f"{key}_{i}", i + 1
    seen.add(key)
    return key


def _walk_files(folder: Path) -> list[str]:
    """Files under `folder` (recursive, hidden skipped), sorted, relative to `folder`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if not f.startswith(".")]
    return sorted(out)


def _names(tree: Path, stop: Path, classes: list[str]) -> list[str] | None:
    """Human class names from a LOC_synset_mapping.txt in `tree` or its parents up to `stop`'s parent."""
    for d in [tree, *tree.parents]:
        f = d / "LOC_synset_mapping.txt"
        if f.is_file():
            table = {}
            for line in f.read_text(errors="replace").splitlines():
                parts = line.strip().split(maxsplit=1)
                if parts:
                    table[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
            return [table.get(c, c) for c in classes]
        if d == stop.parent or d == d.parent:
            break
    return None


def _tree_source(
    tree: Path, classes: list[str] | None, kind: str, name: str, split: str, stop: Path
) -> Source:
    found = _class_dirs(tree)
    classes = classes or found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{tree}: class folders {extra[:5]} are not among the train classes; remove them")
    if not classes:
        raise ValueError(f"{tree}: no class folders found; expected one sub-folder per class")
    items, seen = [], set()
    for c, cname in enumerate(classes):
        if not (tree / cname).is_dir():
            continue
        for rel in _walk_files(tree / cname):
            items.append(Item(_key(cname, rel, seen), c, os.path.join(cname, rel)))
    return Source(kind, name, str(tree), tree, split, classes, _names(tree, stop, classes), items, 3)


def _flat_val(root: Path, val: Path, classes: list[str]) -> Source:
    """ILSVRC val as shipped (flat folder) labelled by LOC_val_solution.csv (Kaggle layout)."""
    sol = next(
        (
            d / "LOC_val_solution.csv"
            for d in [root, *root.parents][:4]
            if (d / "LOC_val_solution.csv").is_file()
        ),
        None,
    )
    if sol is None:
        raise ValueError(f"{val} is flat; arrange it in class folders, or put LOC_val_solution.csv beside it")
    index = {c: i for i, c in enumerate(classes)}
    label = {}
    with open(sol) as f:
        for row in csv.DictReader(f):
            label[row["ImageId"]] = row["PredictionString"].split()[0]
    items, seen = [], set()
    for rel in _walk_files(val):
        stem = os.path.splitext(os.path.basename(rel))[0]
        if stem in label and label[stem] in index:
            items.append(Item(_key(stem, rel, seen), index[label[stem]], rel))
    return Source("imagenet", "", str(val), val, "val", classes, _names(val, root, classes), items, 3)


def _imagenet_split(root: Path, split: str) -> Path | None:
    for sub in ("", "Data/CLS-LOC", "ILSVRC/Data/CLS-LOC"):
        d = root / sub / split if sub else root / split
        if d.is_dir():
            return d
    return None


def open_source(src: str | os.PathLike, split: str = "train") -> Source:
    """Resolve `src` (a path or the name `fashion-mnist`) into a Source with its sorted item list."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"--split must be train, val or test, got {split!r}")
    if str(src) == "fashion-mnist" and not Path(src).exists():
        name = "fashion-mnist" if split == "train" else f"fashion-mnist-{split}"
        return _idx_source(ASSETS, split, name, "bundled:fashion-mnist")
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"source {src} not found; give an image folder tree, an ILSVRC2012 root, "
            "a folder of idx files, or 'fashion-mnist'"
        )
    if not path.is_dir():
        raise ValueError(f"source {src} is a file; give the folder that holds it")
    path = path.resolve()
    base = path.name  # the default output is data/<base>-<side>, e.g. data/ILSVRC2012-256 as recipes expect
    if any(p.name.endswith(("-images-idx3-ubyte", "-images-idx3-ubyte.gz")) for p in path.iterdir()):
        return _idx_source(path, split, base if split == "train" else f"{base}-{split}", str(path))
    split_dir = _imagenet_split(path, split)
    if split_dir is not None:  # ILSVRC-style root with train/ and val/
        name = base if split == "train" else f"{base}-{split}"
        train_dir = _imagenet_split(path, "train")
        classes = _class_dirs(train_dir) if train_dir is not None else None
        if split != "train" and not _class_dirs(split_dir):
            if not classes:
                raise ValueError(f"{split_dir} is flat and there is no train/ to take the classes from")
            s = _flat_val(path, split_dir, classes)
            s.name = name
            return s
        return _tree_source(split_dir, classes, "imagenet", name, split, path)
    if split != "train":
        raise ValueError(
            f"--split {split} needs an ILSVRC root with a {split}/ folder or idx t10k files; "
            f"for a plain class-folder tree point --src at the split folder itself"
        )
    return _tree_source(path, None, "folder", base, split, path)
