"""Tokenizers named as gpt-neox's `tokenizer_type`, behind one small interface.

Every tokenizer has `.name`, `.vocab_size` (the real vocabulary, before padding), `.eod` (the
end-of-document id appended after every document), `.pad`, `tokenize(text)`, `tokenize_batch(texts)`
and `detokenize(ids)`. The backends (`tokenizers`, `sentencepiece`) are imported only when a
tokenizer of that kind is built, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from neox.config import ConfigError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


class Tokenizer:
    """Common interface; subclasses fill `vocab_size`, `eod`, `pad` and the three methods."""

    name: str = "Tokenizer"
    vocab_size: int
    eod: int
    pad: int

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def eos(self) -> int:
        """Megatron-core's name for the end-of-document id."""
        return self.eod

    def describe(self) -> dict:
        """What identifies this tokenizer (goes into dataset index cache keys)."""
        return {"class": self.name, "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


class _HFBackedTokenizer(Tokenizer):
    """Shared code for tokenizers that wrap a `tokenizers.Tokenizer`."""

    def __init__(self, tok, source: str) -> None:
        self._tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eod = tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ConfigError(
                f"{self.name}: tokenizer {source} has no {EOD_TOKEN!r} token; neox appends it after "
                f"every document. Add it as a special token when training the tokenizer."
            )
        self.eod = eod
        pad = tok.token_to_id(PAD_TOKEN)
        self.pad = eod if pad is None else pad

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source}


class HFTokenizer(_HFBackedTokenizer):
    """A `tokenizers` JSON file (the GPT-NeoX-20B tokenizer, or one we trained)."""

    name = "HFTokenizer"

    def __init__(self, vocab_file: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        path = _existing(vocab_file, "vocab_file", self.name, "a tokenizers JSON file (tokenizer.json)")
        super().__init__(_Tok.from_file(str(path)), str(path))


class GPT2BPETokenizer(_HFBackedTokenizer):
    """GPT-2 style byte-level BPE from `vocab.json` + `merges.txt`."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str | Path, merge_file: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers

        vocab = _existing(vocab_file, "vocab_file", self.name, "the GPT-2 vocab.json")
        merges = _existing(merge_file, "merge_file", self.name, "the GPT-2 merges.txt")
        tok = _Tok(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOD_TOKEN) is not None:
            tok.add_special_tokens([EOD_TOKEN])
        super().__init__(tok, f"{vocab}+{merges}")


class HFGPT2Tokenizer(GPT2BPETokenizer):
    """gpt-neox's name for the same GPT-2 vocabulary loaded through Hugging Face."""

    name = "HFGPT2Tokenizer"


class SPMTokenizer(Tokenizer):
    """A sentencepiece `.model`; eod is `<|endoftext|>` when the model has it, else its `</s>`."""

    name = "SPMTokenizer"

    def __init__(self, vocab_file: str | Path) -> None:
        import sentencepiece as spm

        path = _existing(vocab_file, "vocab_file", self.name, "a sentencepiece .model file")
        self.source = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        eod = self._sp.piece_to_id(EOD_TOKEN)
        if eod == self._sp.unk_id() or self._sp.id_to_piece(eod) != EOD_TOKEN:
            eod = self._sp.eos_id()
        if eod < 0:
            raise ConfigError(
                f"{self.name}: {path} has neither {EOD_TOKEN!r} nor an eos piece; train it with "
                f"user_defined_symbols=['{EOD_TOKEN}'] or eos_id >= 0."
            )
        self.eod = eod
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source}


class CharLevelTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, with gpt-neox's ids and size: eod 0, pad 1, vocab_size 512.

    The same ids as gpt-neox's CharLevelTokenizer (and Evo's), so its .bin/.idx data and checkpoints work
    unchanged; like it, a NUL (0) or SOH (1) byte in the text reads as eod / pad. Unlike its per-byte
    `chr` decoding, detokenize decodes UTF-8 (dropping eod, pad and ids above 255), so text round-trips.
    """

    name = "CharLevelTokenizer"

    def __init__(self) -> None:
        self.vocab_size = 512
        self.eod = 0
        self.pad = 1

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 1 < int(i) < 256).decode("utf-8", errors="replace")


TOKENIZER_TYPES = ("HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer")


def build_tokenizer(
    tokenizer_type: str, vocab_file: str | Path | None = None, merge_file: str | Path | None = None
) -> Tokenizer:
    """Build a tokenizer from gpt-neox's `tokenizer_type`, `vocab_file` and `merge_file` settings."""
    kind = (tokenizer_type or "").strip()
    if kind == "HFTokenizer":
        return HFTokenizer(vocab_file)
    if kind in ("HFGPT2Tokenizer", "GPT2BPETokenizer"):
        cls = HFGPT2Tokenizer if kind == "HFGPT2Tokenizer" else GPT2BPETokenizer
        return cls(vocab_file, merge_file)
    if kind == "SPMTokenizer":
        return SPMTokenizer(vocab_file)
    if kind == "CharLevelTokenizer":
        return CharLevelTokenizer()
    raise ConfigError(
        f"tokenizer_type {tokenizer_type!r} is not known; set tokenizer_type to one of "
        f"{', '.join(TOKENIZER_TYPES)}."
    )


def build_tokenizer_from_config(cfg) -> Tokenizer:
    """`build_tokenizer` from a NeoXConfig's `.data` (tokenizer_type, vocab_file, merge_file)."""
    d = cfg.data
    return build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file)


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Round the vocabulary up so that each of `tp` shards is a multiple of `divisible_by` rows."""
    if vocab_size <= 0 or divisible_by <= 0 or tp <= 0:
        raise ConfigError(
            f"padded_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
            f"make_vocab_size_divisible_by={divisible_by}, tp={tp}."
        )
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _existing(path: str | Path | None, key: str, kind: str, what: str) -> Path:
    if path is None:
        raise ConfigError(f"tokenizer_type {kind} needs {key}: set it to {what}.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key} {str(path)!r} (tokenizer_type {kind}) does not exist; set it to {what}.")
    return p

