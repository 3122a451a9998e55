"""One data set split between N sites, as federated learning studies it: a site's share is written as a small JSON
manifest (``site-K.json``) that names the source, the samples' indices in it and a fingerprint of the source, so a
partition is reproducible from its seed and a changed source is refused. ``load_dataset("DIR/site-0.json")``
reads a site's share like any other source.

Schemes (each split of the source — train, val, test — is shared out on its own, so every site keeps the source's
splits; a source without splits is shared out whole):

* ``iid``: a random, equal share of every split;
* ``label-skew``: per class, the sites' shares drawn from a Dirichlet(alpha) distribution (Hsu et al. 2019); the
  same shares apply to every split, so a site's val looks like its train. Small alpha: few classes per site;
* ``by-patient``: whole patients (or series) to sites, balancing the number of images; no patient spans two sites.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.index.dataset import ImageSet
from lepton.errors import DataError

FORMAT = "lepton-partition/1"
SCHEMES = ("iid", "label-skew", "by-patient")
#: A site needs at least this many training images (BatchNorm cannot train on fewer).
MIN_TRAIN = 2
MAX_DRAWS = 200
MAX_SITES = 1000
#: The largest Dirichlet concentration of label-skew (100 is already nearly iid).
MAX_ALPHA = 1e6


def fingerprint(data: ImageSet) -> str:
    """SHA-256 over the labels, splits and every image's pixels: the source a partition was made from."""
    h = hashlib.sha256()
    h.update(np.asarray(data.labels, dtype=np.int64).tobytes())
    h.update("\0".join(map(str, data.splits)).encode())
    for digest in data.content_hashes():
        h.update(digest.encode())
    return h.hexdigest()


def partition_indices(data: ImageSet, sites: int, scheme: str = "iid", alpha: float = 0.5,
                      seed: int = 0) -> list[np.ndarray]:
    """The indices of ``data`` that each of ``sites`` sites holds (sorted, disjoint, covering every sample)."""
    if scheme not in SCHEMES:
        raise DataError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if not 2 <= sites <= MAX_SITES:
        raise DataError(f"--sites must be between 2 and {MAX_SITES} (got {sites})")
    if scheme == "label-skew" and not (isinstance(alpha, int | float) and 0 < alpha <= MAX_ALPHA):
        raise DataError(f"--alpha must be a number above 0 and at most {MAX_ALPHA:g} for label-skew (got {alpha}); "
                        "0.1 is strong skew, 100 nearly iid")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DataError(f"--seed must be a whole number from 0 to {2**32 - 1} (got {seed!r})")
    rng = np.random.default_rng(seed)
    splits = np.asarray(data.splits, dtype=object)
    train = (splits == "train") if "train" in set(splits) else np.ones(len(data), bool)
    for _ in range(MAX_DRAWS):
        parts = _draw(data, sites, scheme, alpha, rng, splits)
        short = [k for k, p in enumerate(parts) if train[p].sum() < MIN_TRAIN]
        if not short:
            return [np.sort(p) for p in parts]
        if scheme != "label-skew":
            break
    raise DataError(f"{data.source}: {scheme} over {sites} sites leaves site(s) {', '.join(map(str, short))} with "
                    f"fewer than {MIN_TRAIN} training images ({len(data)} images in all); use fewer sites"
                    + (" or a larger --alpha" if scheme == "label-skew" else ""))


def _draw(data: ImageSet, sites: int, scheme: str, alpha: float, rng: np.random.Generator,
          splits: np.ndarray) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(sites)]
    if scheme == "by-patient":
        if not data.has_patient_ids:
            raise DataError(f"{data.source}: by-patient needs patient ids (a manifest's patient_id column, or "
                            "DICOM); this source has none: use iid or label-skew")
        groups = np.asarray(data.groups, dtype=object)
        names, inverse = np.unique(groups, return_inverse=True)
        if len(names) < sites:
            raise DataError(f"{data.source}: {len(names)} patients cannot fill {sites} sites")
        sizes = np.bincount(inverse)
        order = rng.permutation(len(names))
        order = order[np.argsort(-sizes[order], kind="stable")]  # largest first, ties in random order
        load = np.zeros(sites, int)
        for g in order:
            k = int(np.argmin(load))
            parts[k] += np.flatnonzero(inverse == g).tolist()
            load[k] += sizes[g]
        return [np.asarray(p, int) for p in parts]
    shares = rng.dirichlet(np.full(sites, alpha), size=data.num_classes) if scheme == "label-skew" else None
    for split in sorted(set(splits)):
        in_split = np.flatnonzero(splits == split)
        if scheme == "iid":
            for k, chunk in enumerate(np.array_split(rng.permutation(in_split), sites)):
                parts[k] += chunk.tolist()
            continue
        for c in range(data.num_classes):
            members = rng.permutation(in_split[data.labels[in_split] == c])
            cuts = np.round(np.cumsum(shares[c])[:-1] * len(members)).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k] += chunk.tolist()
    return [np.asarray(p, int) for p in parts]


def class_counts(data: ImageSet, indices: np.ndarray) -> dict[str, dict[str, int]]:
    """Images per split and class of one site."""
    out: dict[str, dict[str, int]] = {}
    for split in sorted(set(map(str, data.splits[indices]))):
        chosen = indices[data.splits[indices] == split]
        counts = np.bincount(data.labels[chosen], minlength=data.num_classes)
        out[split or "all"] = {name: int(n) for name, n in zip(data.label_names, counts, strict=True)}
    return out


def write_partition(data: ImageSet, source: str, out_dir: Path, sites: int, scheme: str = "iid",
                    alpha: float = 0.5, seed: int = 0, load: dict[str, Any] | None = None) -> list[Path]:
    """Write ``site-0.json`` … ``site-{N-1}.json`` into ``out_dir`` (atomically) and return their paths."""
    from lepton.utils import atomic_write_json

    parts = partition_indices(data, sites, scheme, alpha, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = fingerprint(data)
    paths = []
    for k, indices in enumerate(parts):
        path = out_dir / f"site-{k}.json"
        atomic_write_json(path, {
            "format": FORMAT, "source": source, "load": load or {}, "site": k, "sites": sites, "scheme": scheme,
            "alpha": alpha if scheme == "label-skew" else None, "seed": seed, "fingerprint": digest,
            "label_names": list(data.label_names), "images": len(indices), "counts": class_counts(data, indices),
            "indices": indices.tolist()})
        paths.append(path)
    return paths


def is_partition(path: Path) -> bool:
    """Whether ``path`` is a site manifest (a JSON file of this format)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return FORMAT.encode() in head


def read_partition(path: Path, loader) -> ImageSet:
    """A site's share: its source loaded with ``loader(source, **load)``, checked against the fingerprint,
    reduced to the site's indices. The label set stays the source's, so every site agrees on it."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable partition manifest ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise DataError(f"{path}: not a Lepton partition manifest (format {FORMAT}); write one with "
                        "`lepton data partition`")
    try:
        source, raw, load = str(spec["source"]), spec["indices"], dict(spec.get("load") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: partition manifest is missing or has a bad field ({exc})") from None
    whole = isinstance(raw, list) and all(
        not isinstance(i, bool) and (isinstance(i, int) or (isinstance(i, float) and i.is_integer())) and abs(i) < 2**62
        for i in raw)
    if not whole:
        raise DataError(f"{path}: 'indices' must be a list of whole numbers (rewrite it with `lepton data partition`)")
    indices = np.asarray([int(i) for i in raw], dtype=np.int64) if raw else np.zeros(0, np.int64)
    data = loader(source, **load)
    if fingerprint(data) != spec.get("fingerprint"):
        raise DataError(f"{path}: its source {source} changed since the partition was written (fingerprint "
                        "differs); partition it again with `lepton data partition`")
    if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(data))):
        raise DataError(f"{path}: indices outside the source's {len(data)} images")
    site = data.subset(np.isin(np.arange(len(data)), indices))
    site.source = f"{source} (site {spec.get('site')} of {spec.get('sites')}, {spec.get('scheme')})"
    site.partial_labels = True
    return site
