"""Training datasets with gpt-neox's keys: blending shares, resume, determinism, and two ranks building
one index cache (rank 0 writes it, the other reads it) while reading disjoint DP slices."""

import numpy as np
import pytest
import torch

from neox.config import NeoXConfig
from neox.data.gpt_dataset import build_datasets_from_config, build_train_valid_test_datasets, make_batch_iterator

T = 32
EOD = 399


class Tok:
    """Token ids 0..398 plus eod 399: dataset k of the fixture uses only ids in [100k, 100k + 100)."""

    name = "Tok"
    vocab_size = 400
    eod = EOD
    pad = EOD


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    d = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    out = []
    for k in range(3):
        b = IndexedDatasetBuilder(str(d / f"p{k}.bin"), dtype=np.uint16)
        for _ in range(60 + 20 * k):
            doc = np.append(rng.integers(100 * k, 100 * k + 100, size=int(rng.integers(5, 120))), EOD)
            b.add_document(doc.astype(np.uint16), [doc.size])
        b.finalize(str(d / f"p{k}.idx"))
        out.append(str(d / f"p{k}"))
    return out


def _window(item):
    return item["tokens"].tolist() + item["labels"][-1:].tolist()


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [1.0, 1.0, 6.0]])
def test_blend_shares_follow_weights(prefixes, tmp_path, weights):
    n = 10_000
    train, _, _ = build_train_valid_test_datasets(Tok(), seq_length=T, seed=3, num_samples=(n, None, None),
                                                  train_data_paths=prefixes, train_data_weights=weights,
                                                  cache_dir=tmp_path)
    assert len(train) == n
    ids = np.array([int(train[i]["dataset_id"]) for i in range(n)])
    shares = np.bincount(ids, minlength=3) / n
    assert np.all(np.abs(shares - np.array(weights) / sum(weights)) < 0.01), shares
    for i in range(0, n, 50):  # every sample is cut from the dataset it claims
        k = ids[i]
        body = [t for t in _window(train[i]) if t != EOD]
        assert all(100 * k <= t < 100 * k + 100 for t in body), (i, k)


def _cfg(prefixes, **extra):
    return NeoXConfig.from_dict({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": T,
                                 "max-position-embeddings": T, "seed": 11, **extra})


def test_gpt_neox_keys_data_path_split_and_seq_length(prefixes, tmp_path):
    cfg = _cfg(prefixes, **{"data-path": prefixes[1], "split": "8,2,0"})
    train, valid, test = build_datasets_from_config(cfg, Tok(), (100, 20, None), cache_dir=tmp_path)
    assert test is None and len(train) >= 100 and len(valid) >= 20
    assert train[0]["tokens"].shape == (T,)
    per_split = _cfg(prefixes, **{"train-data-paths": prefixes[:2], "train-data-weights": [1, 3],
                                  "valid-data-paths": [prefixes[2]], "test-data-paths": [prefixes[0]]})
    train, valid, test = build_datasets_from_config(per_split, Tok(), (400, 30, 30), cache_dir=tmp_path)
    assert len(train) == 400 and len(valid) >= 30 and len(test) >= 30
    assert abs(sum(int(train[i]["dataset_id"]) for i in range(400)) - 300) <= 4
    assert all(200 <= t < 300 for t in _window(valid[0]) if t != EOD)
    assert all(t < 100 for t in _window(test[0]) if t != EOD)


def test_resume_after_restart_continues_exactly(prefixes, tmp_path):
    cfg = _cfg(prefixes, **{"train-data-paths": prefixes, "train-data-weights": [1, 1, 1]})
    B, dp, steps, stop = 2, 2, 12, 5
    first, _, _ = build_datasets_from_config(cfg, Tok(), (B * dp * steps, None, None), cache_dir=tmp_path / "a")
    run = [[b["tokens"] for b in make_batch_iterator(first, B, dp_rank=r, dp_size=dp)] for r in range(dp)]
    # a new process: datasets rebuilt (from the cache) and read on from the consumed samples
    again, _, _ = build_datasets_from_config(cfg, Tok(), (B * dp * steps, None, None), cache_dir=tmp_path / "a")
    resumed = [[b["tokens"] for b in make_batch_iterator(again, B, start_sample=stop * B * dp, dp_rank=r,
                                                         dp_size=dp)] for r in range(dp)]
    for r in range(dp):
        assert len(resumed[r]) == steps - stop
        assert all(torch.equal(x, y) for x, y in zip(resumed[r], run[r][stop:], strict=True))
    # and a fresh index build elsewhere gives the same order (seed, not cache, decides it)
    fresh, _, _ = build_datasets_from_config(cfg, Tok(), (B * dp * steps, None, None), cache_dir=tmp_path / "b")
    assert all(_window(fresh[i]) == _window(first[i]) for i in range(B * dp * steps))
    other_seed = _cfg(prefixes, **{"train-data-paths": prefixes, "train-data-weights": [1, 1, 1], "seed": 12})
    moved, _, _ = build_datasets_from_config(other_seed, Tok(), (B * dp * steps, None, None), cache_dir=tmp_path)
    assert [_window(moved[i]) for i in range(8)] != [_window(first[i]) for i in range(8)]


def _rank_build(prefixes, cache, n, B):
    """One rank: build the blended datasets (megatron-core: rank 0 first, barrier, then the others)."""
    import torch.distributed as dist

    saves = []
    real_save = np.save
    np.save = lambda *a, **k: saves.append(str(a[0])) or real_save(*a, **k)
    try:
        train, valid, _ = build_train_valid_test_datasets(
            Tok(), seq_length=T, seed=5, num_samples=(n, 16, None), train_data_paths=prefixes,
            train_data_weights=[1.0, 2.0, 3.0], valid_data_paths=prefixes[:1], cache_dir=cache)
    finally:
        np.save = real_save
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [b["tokens"].tolist() for b in make_batch_iterator(train, B, dp_rank=rank, dp_size=world)]
    return {"saves": saves, "train": [_window(train[i]) for i in range(n)],
            "valid": [_window(valid[i]) for i in range(16)], "mine": mine}


def test_two_ranks_one_index_build_identical_samples_disjoint_slices(prefixes, tmp_path):
    from megatron_ext.testing import run_distributed

    n, B = 64, 4
    r0, r1 = run_distributed(_rank_build, 2, prefixes, str(tmp_path / "cache"), n, B)
    assert r0["saves"] and not r1["saves"]  # rank 0 wrote every index; rank 1 only read them
    kinds = [s.rsplit("/", 1)[-1].split("-", 1)[1] for s in r0["saves"]]
    assert kinds.count("GPTDataset-train-shuffle_index.npy") == 3 and "BlendedDataset-train-dataset_index.npy" in kinds
    assert r0["train"] == r1["train"] and r0["valid"] == r1["valid"]
    single, valid, _ = build_train_valid_test_datasets(  # one process, its own (uncached) blend
        Tok(), seq_length=T, seed=5, num_samples=(n, 16, None), train_data_paths=prefixes,
        train_data_weights=[1.0, 2.0, 3.0], valid_data_paths=prefixes[:1], cache_dir=tmp_path / "single")
    assert r0["train"] == [_window(single[i]) for i in range(n)]
    # DP: step s of rank r holds samples [s*B*2 + r*B, s*B*2 + (r+1)*B): disjoint, together everything
    for step, (a, b) in enumerate(zip(r0["mine"], r1["mine"], strict=True)):
        got = [w[:-1] for w in r0["train"][step * 2 * B:(step + 1) * 2 * B]]
        assert a + b == got
    assert len(r0["mine"]) == n // (2 * B)
