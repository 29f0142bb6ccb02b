"""Megatron-Core's BlendedDataset and the builder that sizes and splits its sources.

`BlendedDataset` mixes several datasets by weight exactly as
`megatron.core.datasets.blended_dataset.BlendedDataset` (megatron-core 0.16.1) does: the
weights are normalized (float64, divided by their numpy sum), and sample `s` of the blend is
taken from the dataset with the largest `weight * max(s, 1) - samples taken from it so far`
(the first on ties) -- `megahf.data.sample_index.build_blending_indices`. Each source's
samples are used in order (its own shuffle already mixed them).

`build_gpt_datasets` is Megatron-Core's `BlendedMegatronDatasetBuilder` for GPT data
(the `blend` case: every split cut from the same files by the split string; and the
`blend_per_split` case: separate files per split). With weights, for a split that must
provide `size` samples, source `d` (normalized weight `w_d`):

* is built with `ceil(ceil(size * w_d) * (1 + surplus))` samples (`surplus` =
  `mid_level_dataset_surplus`, 0.005), so it has a margin over what the blend takes;
* and the blend has `sum_d ceil(size * w_d)` samples -- slightly more than `size`.

The weights are normalized twice (by the builder, then by the BlendedDataset), which can move
the last bit of a weight; megahf does the same so the picks match. A single file without
weights is not blended (its GPTDataset is returned directly); a single file *with* a weight goes
through a BlendedDataset like Megatron-Core, so its source is built with the 0.5% surplus
(a different epoch count, hence a different shuffle, than without a weight). Without weights,
sources are built for one epoch and weighted by their lengths, the blend having
`min(size, total)` samples, or exactly every sample of every source when the size is None.

A blend that would take more samples from a source than it has raises `GPTDatasetError`
(raise `mid_level_dataset_surplus`), as Megatron-Core raises IndexError.

With `config.path_to_cache` set, the two blend arrays are cached like the GPT ones (md5 of a
description that includes the sources' descriptions; the description is stored and compared).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .gpt_dataset import (
    CACHE_FORMAT,
    SPLIT_NAMES,
    GPTDataset,
    GPTDatasetConfig,
    GPTDatasetError,
    _normalize,
    split_ranges,
)
from .index_cache import description_key, load_or_build
from .sample_index import build_blending_indices, build_exhaustive_blending_indices

__all__ = [
    "BlendedDataset",
    "build_gpt_datasets",
    "parse_blend",
    "source_sizes",
]


class BlendedDataset:
    """Several datasets mixed by weight, in Megatron-Core's order.

    Args:
        datasets: the sources (GPTDatasets, or anything with `__len__`/`__getitem__`).
        weights: positive weights, one per source (normalized here).
        size: samples of the blend; None with integer weights takes exactly `weights[d]`
            samples from source `d` (Megatron-Core's exhaustive blend).
        path_to_cache: folder for the index arrays (default: the first source's config's).

    `blend[i]` is the source sample's dict plus `"dataset_id"`.
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[Union[int, float]],
        size: Optional[int],
        path_to_cache: Optional[str] = None,
    ) -> None:
        datasets = list(datasets)
        weights = list(weights)
        if not datasets:
            raise GPTDatasetError("BlendedDataset needs at least one dataset")
        if len(datasets) != len(weights):
            raise GPTDatasetError(f"{len(datasets)} datasets but {len(weights)} weights")
        if len(datasets) >= 32767:
            raise GPTDatasetError(f"at most 32766 datasets can be blended, got {len(datasets)}")
        if not all(w > 0 for w in weights):
            raise GPTDatasetError(f"blend weights must be positive, got {weights}")
        if size is None:
            if not all(float(w) == int(w) for w in weights):
                raise GPTDatasetError("with size=None the weights must be whole sample counts")
            weights = [int(w) for w in weights]
        else:
            if int(size) < 0:
                raise GPTDatasetError(f"size must be >= 0, got {size}")
            size = int(size)
            weights = _normalize(weights)
        self.datasets = datasets
        self.weights = weights
        self.size = size
        if path_to_cache is None:
            cfg = getattr(datasets[0], "config", None)
            path_to_cache = getattr(cfg, "path_to_cache", None)
        self.path_to_cache = path_to_cache
        splits = {getattr(d, "split_name", None) for d in datasets}
        self.split_name = splits.pop() if len(splits) == 1 else None
        self._description: Optional[str] = None
        self.cache_paths: Optional[Dict[str, str]] = None
        self.loaded_from_cache = False
        self.dataset_index, self.dataset_sample_index = self._build_or_load()
        self._check_sizes()

    @property
    def description_json(self) -> str:
        """What the blend arrays depend on (the sources' descriptions, weights, size), as JSON."""
        if self._description is None:
            self._description = json.dumps(
                {
                    "class": "megahf.data.BlendedDataset",
                    "format": CACHE_FORMAT,
                    "datasets": [_source_description(d) for d in self.datasets],
                    "weights": self.weights,
                    "size": self.size,
                },
                indent=4,
            )
        return self._description

    def description(self) -> Dict[str, Any]:
        return json.loads(self.description_json)

    @property
    def cache_key(self) -> str:
        return description_key(self.description_json)

    def _build(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.size is None:
            return build_exhaustive_blending_indices(self.weights)
        return build_blending_indices(self.weights, self.size)

    def _build_or_load(self) -> Tuple[np.ndarray, np.ndarray]:
        expected = self.size if self.size is not None else sum(self.weights)
        arrays, self.cache_paths, self.loaded_from_cache = load_or_build(
            self.path_to_cache,
            f"BlendedDataset-{self.split_name or 'mixed'}",
            self.description_json if self.path_to_cache else "",
            ("dataset_index", "dataset_sample_index"),
            self._build,
            lambda di, si: di.shape == si.shape == (expected,) and di.dtype == np.int16 and si.dtype == np.int64,
        )
        return arrays

    def _check_sizes(self) -> None:
        counts = np.bincount(np.asarray(self.dataset_index), minlength=len(self.datasets))
        for d, (want, ds) in enumerate(zip(counts, self.datasets)):
            if want > len(ds):
                raise GPTDatasetError(
                    f"the {self.split_name or ''} blend takes {int(want)} samples from source {d} "
                    f"({ds!r}), which has only {len(ds)}; raise mid_level_dataset_surplus (now "
                    f"{_surplus_of(ds)}) e.g. ten-fold so each source builds a larger margin"
                )

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def locate(self, idx: int) -> Tuple[int, int]:
        """(source, sample of that source) of blend sample `idx`."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sample {idx} out of range for a blend of {n} samples")
        return int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])

    def get_tokens(self, idx: int) -> np.ndarray:
        d, s = self.locate(int(idx))
        return self.datasets[d].get_tokens(s)

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        d, s = self.locate(int(idx))
        return {"dataset_id": d, **self.datasets[d][s]}

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        if self.loaded_from_cache:
            state["dataset_index"] = state["dataset_sample_index"] = None  # reopened from the files
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.dataset_index is None:
            self.dataset_index = np.load(self.cache_paths["dataset_index"], mmap_mode="r")
            self.dataset_sample_index = np.load(self.cache_paths["dataset_sample_index"], mmap_mode="r")

    def __repr__(self) -> str:
        return f"BlendedDataset({self.split_name}, sources={len(self.datasets)}, samples={len(self)})"


def _source_description(ds: Any) -> Any:
    if hasattr(ds, "description"):
        return ds.description()
    return {"class": type(ds).__name__, "length": len(ds)}


def _surplus_of(ds: Any) -> Any:
    cfg = getattr(ds, "config", None)
    return getattr(cfg, "mid_level_dataset_surplus", "?")


# ------------------------------------------------------------------------------------- builder
def source_sizes(weights: Sequence[float], size: int, surplus: float = 0.0) -> List[int]:
    """Samples each source provides for a blend of `size`: `ceil(ceil(size * w) * (1 + surplus))`
    with the normalized weights `w` (surplus 0 gives the blend's own shares)."""
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]


def parse_blend(items: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron-LM's `--data-path` list: `["30", "a", "70", "b"]` -> (["a", "b"], [30.0, 70.0]);
    `["a", "b"]` -> (["a", "b"], None)."""
    items = [str(x) for x in items]
    if len(items) % 2 == 0 and items:
        try:
            weights = [float(items[i]) for i in range(0, len(items), 2)]
            return [items[i + 1].strip() for i in range(0, len(items), 2)], weights
        except ValueError:
            pass
    return [x.strip() for x in items], None


def _open(source: Any) -> Any:
    """A path (anything `megahf.data.token_files.open_token_data` opens: a Megatron prefix, datatrove's token
    files) opened and checked; an opened dataset as is."""
    if isinstance(source, (str, os.PathLike)):
        from .token_files import open_token_data

        return open_token_data(source)
    return source


def _splits_of(indexed: Any, config: GPTDatasetConfig, only: Optional[int]) -> List[Optional[range]]:
    """The split ranges of `indexed`: by `config.split`, or all of it for split `only`."""
    n = int(np.asarray(indexed.sequence_lengths).shape[0])
    if only is None:
        return split_ranges(n, config.split)
    out: List[Optional[range]] = [None] * len(SPLIT_NAMES)
    out[only] = range(0, n)
    return out


def _build_sources(
    sources: Sequence[Any],
    sizes_per_source: List[List[Optional[int]]],
    config: GPTDatasetConfig,
    only: Optional[int],
    wanted: Sequence[int],
) -> List[List[Optional[GPTDataset]]]:
    """For each split, the GPTDataset of each source (None where the split is not built)."""
    per_split: List[List[Optional[GPTDataset]]] = [[] for _ in SPLIT_NAMES]
    for source, sizes in zip(sources, sizes_per_source):
        indexed = _open(source)
        ranges = _splits_of(indexed, config, only)
        for i, name in enumerate(SPLIT_NAMES):
            if ranges[i] is None or i not in wanted:
                per_split[i].append(None)
            else:
                per_split[i].append(GPTDataset(indexed, ranges[i], sizes[i], config, name))
    return per_split


def _blend_one(
    sources: Sequence[Any],
    weights: Optional[Sequence[float]],
    sizes: Sequence[Optional[int]],
    config: GPTDatasetConfig,
    only: Optional[int],
    wanted: Sequence[int],
) -> List[Optional[Any]]:
    """Megatron-Core's builder for one blend: the splits `wanted`, cut by `config.split`
    (`only` None) or each file taken whole as split `only`."""
    if weights is not None:
        if len(weights) != len(sources):
            raise GPTDatasetError(f"{len(sources)} data paths but {len(weights)} weights")
        weights = _normalize(weights)
    if len(sources) == 1 and weights is None:
        indexed = _open(sources[0])
        ranges = _splits_of(indexed, config, only)
        return [
            GPTDataset(indexed, ranges[i], sizes[i], config, SPLIT_NAMES[i])
            if i in wanted and ranges[i] is not None
            else None
            for i in range(len(SPLIT_NAMES))
        ]
    if weights is None:
        sizes_per_source = [[None] * len(SPLIT_NAMES) for _ in sources]
        targets = None
    else:
        for i in wanted:
            if sizes[i] is None:
                raise GPTDatasetError(
                    f"a weighted blend needs a sample count for the {SPLIT_NAMES[i]} split, got None"
                )
        targets = [
            source_sizes(weights, sizes[i], 0.0) if i in wanted else [None] * len(sources)
            for i in range(len(SPLIT_NAMES))
        ]
        buffers = [
            source_sizes(weights, sizes[i], config.mid_level_dataset_surplus)
            if i in wanted
            else [None] * len(sources)
            for i in range(len(SPLIT_NAMES))
        ]
        sizes_per_source = [[buffers[i][d] for i in range(len(SPLIT_NAMES))] for d in range(len(sources))]
    per_split = _build_sources(sources, sizes_per_source, config, only, wanted)
    out: List[Optional[Any]] = [None] * len(SPLIT_NAMES)
    for i in wanted:
        parts = per_split[i]
        if any(p is None for p in parts):
            continue  # the split has weight 0
        if weights is not None:
            out[i] = BlendedDataset(parts, weights, sum(targets[i]), config.path_to_cache)
        else:
            lengths = [len(p) for p in parts]
            size = min(sizes[i], sum(lengths)) if sizes[i] is not None else None
            out[i] = BlendedDataset(parts, lengths, size, config.path_to_cache)
    return out


def build_gpt_datasets(
    blend: Optional[Tuple[Sequence[Any], Optional[Sequence[float]]]],
    sizes: Sequence[Optional[int]],
    config: GPTDatasetConfig,
    blend_per_split: Optional[Sequence[Optional[Tuple[Sequence[Any], Optional[Sequence[float]]]]]] = None,
) -> List[Optional[Any]]:
    """`[train, valid, test]` datasets, as Megatron-Core's `BlendedMegatronDatasetBuilder`.

    Args:
        blend: `(paths, weights)`: path prefixes (or opened indexed datasets) and their weights
            (None: one file as is, or several weighted by their lengths); every split is cut
            from each file by `config.split`. A lone path means `([path], None)`.
        sizes: samples wanted per split; None builds one epoch. A split asked for 0 samples is
            not built (None) -- Megatron-Core would build one epoch of it.
        blend_per_split: instead of `blend`, one `(paths, weights)` (or None) per split,
            each file used whole for its split (`config.split` is ignored).

    A split of weight 0 in `config.split` is None.
    """
    sizes = list(sizes) + [None] * (len(SPLIT_NAMES) - len(sizes))
    if len(sizes) != len(SPLIT_NAMES):
        raise GPTDatasetError(f"sizes must have at most {len(SPLIT_NAMES)} entries, got {len(sizes)}")
    if any(s is not None and int(s) < 0 for s in sizes):
        raise GPTDatasetError(f"sizes must be >= 0 or None, got {sizes}")
    skip = [s is not None and int(s) == 0 for s in sizes]
    if (blend is None) == (blend_per_split is None):
        raise GPTDatasetError("pass exactly one of blend and blend_per_split")
    out: List[Optional[Any]] = [None] * len(SPLIT_NAMES)
    if blend is not None:
        if isinstance(blend, (str, os.PathLike)) or hasattr(blend, "sequence_lengths"):
            blend = ([blend], None)  # one file, as is
        prefixes, weights = blend
        if isinstance(prefixes, (str, os.PathLike)):
            prefixes = [prefixes]
        wanted = [i for i in range(len(SPLIT_NAMES)) if not skip[i]]
        return _blend_one(list(prefixes), weights, sizes, config, None, wanted)
    if len(blend_per_split) != len(SPLIT_NAMES):
        raise GPTDatasetError(f"blend_per_split needs {len(SPLIT_NAMES)} entries (train, valid, test)")
    for i, b in enumerate(blend_per_split):
        if b is None or skip[i]:
            continue
        prefixes, weights = b
        if isinstance(prefixes, (str, os.PathLike)):
            prefixes = [prefixes]
        if len(prefixes) == 1:
            weights = None  # Megatron-Core ignores the weight of a lone per-split file
        out[i] = _blend_one(list(prefixes), weights, sizes, config, i, [i])[i]
    return out
