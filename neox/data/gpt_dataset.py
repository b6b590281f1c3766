"""GPT pretraining datasets through megatron-core, and a resumable micro-batch iterator.

megatron-core's `BlendedMegatronDatasetBuilder` + `GPTDataset` do the work (document shuffling,
sample windows that cross document boundaries, blending, `.npy` index caching). Here we only
translate gpt-neox settings into its `GPTDatasetConfig`, give it a tokenizer view it understands,
and make it work in one process without `torch.distributed`.

Every item is a dict with `tokens` [T] and `labels` [T] (the next tokens: one window of T + 1 ids,
shifted) and `loss_mask` [T]. When `torch.distributed` is initialised, all ranks must call
`build_train_valid_test_datasets` together: rank 0 builds the index cache first, the others load it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from neox.config import ConfigError

SPLITS = ("train", "valid", "test")


class MegatronTokenizerView:
    """The part of megatron-core's tokenizer interface that its GPT datasets read."""

    def __init__(self, tokenizer) -> None:
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = int(tokenizer.eod)
        self.eos = self.eod
        # A pad id equal to eod would make megatron mask every eod out of the loss; -1 never occurs.
        self.pad = -1 if tokenizer.pad == tokenizer.eod else int(tokenizer.pad)
        describe = getattr(tokenizer, "describe", None)
        ident = describe() if describe else {"class": type(tokenizer).__name__}
        self.unique_identifiers = {k: str(v) for k, v in sorted({**ident, "eod": self.eod}.items())}


def index_cache_dir(prefixes: Sequence[str], cache_dir: str | Path | None = None) -> Path:
    """Where megatron-core's sample indices go: `<first prefix>_cache/<fingerprint of the data>`.

    megatron keys its cache on the path, not the content, so a rebuilt dataset at the same path would
    silently reuse stale indices; the fingerprint (sizes and mtimes of every .bin/.idx) prevents that.
    """
    h = hashlib.sha256()
    for prefix in sorted(set(prefixes)):
        for ext in (".bin", ".idx"):
            st = os.stat(f"{prefix}{ext}")
            h.update(f"{os.path.abspath(prefix)}{ext}:{st.st_size}:{st.st_mtime_ns};".encode())
    root = Path(cache_dir) if cache_dir is not None else Path(f"{prefixes[0]}_cache")
    return root / h.hexdigest()[:16]


def build_train_valid_test_datasets(
    tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None] = (None, None, None),
    data_path: str | Sequence[str] | None = None,
    data_weights: Sequence[float] | None = None,
    split: str = "969,30,1",
    train_data_paths: Sequence[str] | None = None,
    valid_data_paths: Sequence[str] | None = None,
    test_data_paths: Sequence[str] | None = None,
    train_data_weights: Sequence[float] | None = None,
    valid_data_weights: Sequence[float] | None = None,
    test_data_weights: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    build_on_this_rank: bool = True,
    mmap: bool = True,
    check_vocab: bool = True,
) -> tuple:
    """(train, valid, test) megatron-core datasets; a split with no data is None.

    Either `data_path` (one prefix, or several blended by `data_weights`) cut by `split`, or
    separate `*_data_paths` per split, each optionally blended by `*_data_weights`.
    `num_samples[i]` is how many samples split i must provide (None: one epoch).

    Before megatron-core opens anything, every prefix is validated (`validate_indexed_dataset`) and,
    with `check_vocab`, scanned for token ids outside `tokenizer.vocab_size` (`check_token_range`;
    the result is cached beside the sample indices). Both raise DataError (a ConfigError).
    """
    with warnings.catch_warnings():  # megatron-core warns at import that Apex/TE are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if len(num_samples) != 3:
        raise ConfigError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    per_split = (train_data_paths, valid_data_paths, test_data_paths)
    per_split_weights = (train_data_weights, valid_data_weights, test_data_weights)
    blend = blend_per_split = None
    if any(per_split):
        if data_path:
            raise ConfigError("set either data_path (with split) or train/valid/test_data_paths, not both")
        blend_per_split = [
            _blend(f"{name}_data_paths", paths, weights)
            for name, paths, weights in zip(SPLITS, per_split, per_split_weights)
        ]
        all_prefixes = [p for b in blend_per_split if b for p in b[0]]
        split = None
    elif data_path:
        blend = _blend("data_path", [data_path] if isinstance(data_path, str | Path) else data_path,
                       data_weights)
        all_prefixes = blend[0]
    else:
        raise ConfigError(
            "no training data: set data_path (a .bin/.idx prefix), or train_data_paths; "
            "`python tools/prepare_default_data.py` builds the embedded default corpus."
        )

    cache = index_cache_dir(all_prefixes, cache_dir)
    check_datasets(all_prefixes, int(tokenizer.vocab_size) if check_vocab else None, cache)
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=str(cache),
        mmap_bin_files=mmap,
        tokenizer=MegatronTokenizerView(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # our models build their causal mask themselves
    )
    sizes = [None if n is None else int(n) for n in num_samples]
    builder = _builder_class()(GPTDataset, sizes, lambda: build_on_this_rank, config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single MegatronDataset.*")
        return tuple(builder.build())


def check_datasets(prefixes: Sequence[str], vocab_size: int | None, cache: str | Path | None = None) -> None:
    """Validate every prefix; with vocab_size, check every token id is below it (max ids cached in `cache`).

    Every rank runs this (no collective: a rank that raised would leave the others waiting in
    megatron-core's barrier); the cached scan makes the second start free.
    """
    import json

    from neox.data.indexed import check_token_range, validate_indexed_dataset

    infos = {p: validate_indexed_dataset(p) for p in dict.fromkeys(prefixes)}
    if vocab_size is None:
        return
    path = Path(cache) / "max_token_id.json" if cache is not None else None
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        known = {}
    fresh = {}
    for p, info in infos.items():
        key = os.path.abspath(p)
        if key in known and isinstance(known[key], int) and known[key] < vocab_size:
            continue
        fresh[key] = check_token_range(p, vocab_size, info)
    if fresh and path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({**known, **fresh}, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:  # a read-only cache only costs a rescan next time
            pass


def _blend(key: str, paths: Sequence[str] | None, weights: Sequence[float] | None):
    """megatron's (prefixes, weights) pair, after checking that every prefix exists."""
    if not paths:
        return None
    prefixes = [str(p) for p in paths]
    for p in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(f"{p}{ext}")]
        if missing:
            raise ConfigError(
                f"{key}: dataset prefix {p!r} has no {' or '.join(missing)} file; give the path without "
                f"the extension (as written by tools/preprocess_data.py)."
            )
    if weights is not None:
        if len(weights) != len(prefixes):
            raise ConfigError(f"{key}: {len(weights)} weights for {len(prefixes)} paths; give one per path")
        weights = [float(w) for w in weights]
    return prefixes, weights


@functools.cache
def _builder_class():
    """A builder that skips BlendedDataset's index cache without torch.distributed.

    megatron-core 0.16 calls `torch.distributed.get_rank()` on a BlendedDataset cache miss, which
    fails in a single process; the blending indices are cheap, so there we build them uncached.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *rest, config = args
                args = (*rest, dataclasses.replace(config, path_to_cache=None))
                log = logging.getLogger(BlendedDataset.__module__)
                level = log.level
                log.setLevel(logging.ERROR)  # silence "Cannot save the BlendedDataset indexes"
                try:
                    return BlendedMegatronDatasetBuilder.build_generic_dataset(
                        cls, is_built_on_rank, synchronize_ranks, *args
                    )
                finally:
                    log.setLevel(level)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )

    return Builder




def make_batch_iterator(
    dataset, micro_batch_size: int, start_sample: int = 0, dp_rank: int = 0, dp_size: int = 1
) -> Iterator[dict]:
    """This DP rank's micro-batches {"tokens", "labels": LongTensor [B, T], "loss_mask": [B, T]}.

    Megatron's pretraining order: the dataset is read in index order from `start_sample` (the global
    number of samples already consumed), in chunks of B * dp_size; rank r takes the r-th B of each.
    So a run resumed with start_sample = consumed samples continues exactly where it stopped. A last
    chunk shorter than B * dp_size is dropped.
    """
    import torch

    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or start_sample < 0:
        raise ConfigError(
            f"make_batch_iterator: need micro_batch_size >= 1, 0 <= dp_rank < dp_size, start_sample >= 0; "
            f"got {micro_batch_size}, {dp_rank}, {dp_size}, {start_sample}"
        )
    chunk = micro_batch_size * dp_size
    first = start_sample + dp_rank * micro_batch_size
    n = len(dataset)
    while first - dp_rank * micro_batch_size + chunk <= n:
        items = [dataset[i] for i in range(first, first + micro_batch_size)]
        yield {
            "tokens": torch.stack([it["tokens"] for it in items]).long(),  # [B, T]
            "labels": torch.stack([it["labels"] for it in items]).long(),  # [B, T]
            "loss_mask": torch.stack([it["loss_mask"] for it in items]).float(),  # [B, T]
        }
        first += chunk


def build_datasets_from_config(cfg, tokenizer, num_samples: Sequence[int | None], *,
                               cache_dir: str | Path | None = None, build_on_this_rank: bool = True) -> tuple:
    """`build_train_valid_test_datasets` from a NeoXConfig (.data, .model.seq_length, .training.seed)."""
    d = cfg.data
    return build_train_valid_test_datasets(
        tokenizer,
        seq_length=cfg.model.seq_length,
        seed=cfg.training.seed,
        num_samples=num_samples,
        data_path=d.data_path,
        split=d.split,
        train_data_paths=d.train_data_paths,
        valid_data_paths=d.valid_data_paths,
        test_data_paths=d.test_data_paths,
        train_data_weights=d.train_data_weights,
        valid_data_weights=d.valid_data_weights,
        test_data_weights=d.test_data_weights,
        eod_mask_loss=getattr(d, "eod_mask_loss", False),
        mmap=getattr(d, "data_impl", "mmap") in ("mmap", "infer"),
        cache_dir=cache_dir,
        build_on_this_rank=build_on_this_rank,
    )
