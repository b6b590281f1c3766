"""neox.data.tokenizers against the libraries it wraps (tokenizers, sentencepiece) used directly."""

import json

import pytest

from neox.config import ConfigError
from neox.data.tokenizers import TOKENIZER_TYPES, build_tokenizer, padded_vocab_size

TEXTS = [
    "def tokenize(text):\n    return [ord(c) for c in text]  # bytes, not chars\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé: naïve café, 東京, emoji 🙂!",
    "  leading spaces\tand tabs\n\n\nand blank lines  ",
    "<|endoftext|> in the middle <|endoftext|>",
]


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]] + TEXTS * 5


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A tiny byte-level BPE trained with `tokenizers` directly: (reference Tokenizer, tmp dir)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    tok.model.save(str(d))  # vocab.json + merges.txt
    return tok, d


def test_hf_tokenizer_matches_tokenizers_library(bpe):
    ref, d = bpe
    tok = build_tokenizer("HFTokenizer", d / "tokenizer.json")
    assert tok.vocab_size == ref.get_vocab_size() == 600
    assert tok.eod == ref.token_to_id("<|endoftext|>") == 0
    assert tok.pad == ref.token_to_id("<|padding|>") == 1
    for text in TEXTS:
        assert tok.tokenize(text) == ref.encode(text).ids
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_batch(TEXTS) == [tok.tokenize(t) for t in TEXTS]
    assert tok.tokenize(TEXTS[3]).count(tok.eod) == 2  # the special token is matched in text


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "HFGPT2Tokenizer"])
def test_gpt2_vocab_and_merges_match_tokenizer_json(bpe, kind):
    ref, d = bpe
    tok = build_tokenizer(kind, d / "vocab.json", d / "merges.txt")
    assert tok.vocab_size == ref.get_vocab_size()
    assert tok.eod == ref.token_to_id("<|endoftext|>")
    for text in TEXTS:
        assert tok.tokenize(text) == ref.encode(text).ids
        assert tok.detokenize(tok.tokenize(text)) == text


def test_real_gpt2_vocab_from_vocab_and_merges(shared_data, tmp_path):
    """GPT-2's vocab.json + merges.txt (cut out of its tokenizer.json) give the tokenizer.json's ids."""
    from tokenizers import Tokenizer

    path = shared_data / "gpt2_tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    spec = json.loads(path.read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = build_tokenizer("GPT2BPETokenizer", tmp_path / "vocab.json", tmp_path / "merges.txt")
    ref = Tokenizer.from_file(str(path))
    assert tok.vocab_size == 50257 and tok.eod == 50256
    for text in TEXTS:
        assert tok.tokenize(text) == ref.encode(text).ids
        assert tok.detokenize(tok.tokenize(text)) == text


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(line for t in _corpus() for line in t.splitlines() if line.strip()),
                      encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600, model_type="bpe",
        user_defined_symbols=["<|endoftext|>"], character_coverage=1.0, byte_fallback=True,
        minloglevel=2,
    )
    tok = build_tokenizer("SPMTokenizer", tmp_path / "sp.model")
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.vocab_size == ref.get_piece_size() == 600
    assert tok.eod == ref.piece_to_id("<|endoftext|>") != ref.unk_id()
    text = "def tokenize(text): return text.split()"
    assert tok.tokenize(text) == ref.encode(text)
    assert tok.detokenize(tok.tokenize(text)) == ref.decode(ref.encode(text)) == text
    assert tok.tokenize_batch([text, "abc"]) == [tok.tokenize(text), tok.tokenize("abc")]


def test_char_level_tokenizer_round_trips_bytes():
    tok = build_tokenizer("CharLevelTokenizer")
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.detokenize(ids + [tok.eod]) == text
        assert max(ids) < tok.vocab_size
    assert tok.tokenize("Az") == [ord("A"), ord("z")]
    # gpt-neox's CharLevelTokenizer(vocab_size=512): eod 0, pad 1, so its data and checkpoints read unchanged
    assert (tok.eod, tok.pad, tok.vocab_size) == (0, 1, 512)
    assert tok.detokenize([tok.pad, *tok.tokenize("\tß\n"), tok.eod, 300]) == "\tß\n"


def test_unknown_type_and_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_tokenizer("BertWordPiece")
    assert all(name in str(err.value) for name in TOKENIZER_TYPES)
    with pytest.raises(ConfigError, match="vocab_file"):
        build_tokenizer("HFTokenizer", None)
    with pytest.raises(ConfigError, match="does not exist"):
        build_tokenizer("HFTokenizer", tmp_path / "nope.json")
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match="merge_file"):
        build_tokenizer("GPT2BPETokenizer", tmp_path / "vocab.json", None)


@pytest.mark.parametrize("vocab", [1, 127, 128, 129, 8192, 50257, 50277])
@pytest.mark.parametrize("divisible_by,tp", [(128, 1), (128, 2), (8, 3), (1, 1)])
def test_padded_vocab_size_is_smallest_multiple(vocab, divisible_by, tp):
    got = padded_vocab_size(vocab, divisible_by, tp)
    expected = next(v for v in range(vocab, vocab + divisible_by * tp + 1) if v % (divisible_by * tp) == 0)
    assert got == expected


def test_gpt_neox_20b_tokenizer(shared_data):
    from tokenizers import Tokenizer

    path = shared_data / "20B_tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    tok = build_tokenizer("HFTokenizer", path)
    ref = Tokenizer.from_file(str(path))
    assert tok.vocab_size == 50277
    assert padded_vocab_size(tok.vocab_size, 128, 2) == 50432
    assert tok.eod == ref.token_to_id("<|endoftext|>") == 0
    assert tok.pad == ref.token_to_id("<|padding|>") == 1
    for text in TEXTS:
        assert tok.tokenize(text) == ref.encode(text).ids
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize("Hello world") == [12092, 1533]
