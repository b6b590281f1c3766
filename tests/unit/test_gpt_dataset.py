"""GPT datasets over megatron-core, checked against the documents read straight from the .bin/.idx."""

import os

import pytest
import torch

from neox.config import ConfigError
from neox.data.default_corpus import build_default_corpus
from neox.data.gpt_dataset import build_train_valid_test_datasets, index_cache_dir, make_batch_iterator
from neox.data.tokenizers import build_tokenizer

T = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    r = build_default_corpus(tmp_path_factory.mktemp("default"), max_bytes=200_000, vocab_size=400, log=None)
    ds = IndexedDataset(r["data_prefix"])
    r["docs"] = [ds[i].tolist() for i in range(len(ds))]  # each ends with eod
    r["tok"] = build_tokenizer("HFTokenizer", r["tokenizer_file"])
    return r


def _build(corpus, seed=1234, num_samples=(None, None, None), **kw):
    kw.setdefault("data_path", corpus["data_prefix"])
    kw.setdefault("split", corpus["split"])
    return build_train_valid_test_datasets(corpus["tok"], seq_length=T, seed=seed, num_samples=num_samples,
                                           **kw)


def _window(item):
    return item["tokens"].tolist() + item["labels"][-1:].tolist()  # the T + 1 ids it was cut from


def _joined(docs):
    """Documents as one string "|,a,b,0,|,c,0,|" so that slices are found with str.find (C speed)."""
    return "|" + "|".join("," + ",".join(map(str, d)) + "," for d in docs) + "|"


def _is_piece_of_documents(window, joined):
    """True when window = (suffix of a doc) + whole docs + (prefix of a doc), cut at eod boundaries."""
    eod = 0
    cuts = [i + 1 for i, t in enumerate(window) if t == eod]
    pieces = [window[a:b] for a, b in zip([0, *cuts], [*cuts, len(window)]) if b > a]
    for k, piece in enumerate(pieces):
        body = ",".join(map(str, piece))
        if k == 0 and len(pieces) == 1:
            pattern = f",{body},"  # anywhere inside one document
        elif k == 0:
            pattern = f",{body},|"  # the end of a document
        elif k == len(pieces) - 1 and piece[-1] != eod:
            pattern = f"|,{body},"  # the start of a document
        else:
            pattern = f"|,{body},|"  # a whole document
        if pattern not in joined:
            return False
    return True


def test_samples_are_windows_of_the_right_documents(corpus):
    train, valid, test = _build(corpus)
    n_train = corpus["num_train_documents"]
    train_docs, valid_docs = corpus["docs"][:n_train], corpus["docs"][n_train:]
    assert test is None
    # one epoch: every train token but the last is the start of exactly one (T+1)-window step
    assert len(train) == (sum(map(len, train_docs)) - 1) // T
    for ds, docs, other in ((train, _joined(train_docs), _joined(valid_docs)),
                            (valid, _joined(valid_docs), _joined(train_docs))):
        for i in range(len(ds)):
            item = ds[i]
            assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (T,)
            assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
            assert torch.all(item["loss_mask"] == 1)
            assert _is_piece_of_documents(_window(item), docs), i
        assert not all(_is_piece_of_documents(_window(ds[i]), other) for i in range(min(len(ds), 20)))


def test_epoch_covers_every_train_token_once(corpus):
    train, _, _ = _build(corpus)
    n_train = corpus["num_train_documents"]
    counts = torch.zeros(400, dtype=torch.long)
    for i in range(len(train)):
        counts += torch.bincount(train[i]["tokens"], minlength=400)
    stream = torch.tensor([t for d in corpus["docs"][:n_train] for t in d])
    expected = torch.bincount(stream, minlength=400)
    # the epoch's windows tile the stream except its last (len - 1) % T + 1 tokens
    assert torch.all(counts <= expected) and expected.sum() - counts.sum() == (len(stream) - 1) % T + 1


def test_order_depends_only_on_seed(corpus, tmp_path):
    a, _, _ = _build(corpus, seed=1)
    b, _, _ = _build(corpus, seed=1, cache_dir=tmp_path)  # a fresh index build elsewhere
    c, _, _ = _build(corpus, seed=2)
    first = [_window(a[i]) for i in range(10)]
    assert first == [_window(b[i]) for i in range(10)]
    assert first != [_window(c[i]) for i in range(10)]


def test_more_samples_than_an_epoch_and_eod_mask(corpus):
    one_epoch = len(_build(corpus)[0])
    train, _, _ = _build(corpus, num_samples=(3 * one_epoch, 5, None), eod_mask_loss=True)
    assert len(train) >= 3 * one_epoch
    for i in range(0, len(train), 7):
        item = train[i]
        assert torch.equal(item["loss_mask"] == 0, item["tokens"] == corpus["tok"].eod)


def test_batch_iterator_order_dp_split_and_resume(corpus):
    train, _, _ = _build(corpus)
    B, dp = 2, 3
    full = list(make_batch_iterator(train, B * dp))
    ranks = [list(make_batch_iterator(train, B, dp_rank=r, dp_size=dp)) for r in range(dp)]
    assert len(full) == len(train) // (B * dp) and all(len(r) == len(full) for r in ranks)
    for step, batch in enumerate(full):
        assert batch["tokens"].shape == (B * dp, T) and batch["tokens"].dtype == torch.long
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(torch.cat([ranks[r][step][key] for r in range(dp)]), batch[key])
    expected = torch.stack([train[i]["tokens"] for i in range(B * dp)])
    assert torch.equal(full[0]["tokens"], expected)
    resumed = list(make_batch_iterator(train, B, start_sample=4 * B * dp, dp_rank=1, dp_size=dp))
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(resumed, ranks[1][4:], strict=True))


def test_blending_per_split_in_one_process(corpus):
    prefix = corpus["data_prefix"]
    train, valid, test = _build(
        corpus, data_path=None, split=None, num_samples=(300, 20, None),
        train_data_paths=[prefix, prefix], train_data_weights=[1.0, 3.0], valid_data_paths=[prefix],
    )
    assert len(train) == 300 and test is None and len(valid) >= 20
    ids = torch.tensor([int(train[i]["dataset_id"]) for i in range(300)])
    assert abs(int((ids == 1).sum()) - 225) <= 3
    joined = _joined(corpus["docs"])
    assert all(_is_piece_of_documents(_window(train[i]), joined) for i in range(300))


def test_bad_paths_raise_config_errors(corpus, tmp_path):
    with pytest.raises(ConfigError, match="train_data_paths"):
        _build(corpus, data_path=None, train_data_paths=[str(tmp_path / "missing_text_document")])
    with pytest.raises(ConfigError, match="no training data"):
        _build(corpus, data_path=None)
    with pytest.raises(ConfigError, match="weights"):
        _build(corpus, data_weights=[1.0, 2.0])


def test_index_cache_follows_data_changes(corpus):
    prefix = corpus["data_prefix"]
    before = index_cache_dir([prefix])
    assert before.parent.name == os.path.basename(prefix) + "_cache"
    st = os.stat(prefix + ".bin")
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert index_cache_dir([prefix]) != before
