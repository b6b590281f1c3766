"""DataConfig: where tokens come from and how they are tokenized (gpt-neox key names)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .fields import opt, require_choice

TOKENIZERS = ("HFTokenizer", "GPT2BPETokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "CharLevelTokenizer")
DATA_IMPLS = ("infer", "mmap")


@dataclass
class DataConfig:
    """Datasets (Megatron .bin/.idx prefixes) and the tokenizer."""

    data_path: str | None = opt(
        None, "One dataset prefix (path/to/name_text_document, without .bin/.idx), split by `split`."
    )
    train_data_paths: list[str] | None = opt(None, "Training prefixes (instead of data_path + split).")
    valid_data_paths: list[str] | None = opt(None, "Validation prefixes.")
    test_data_paths: list[str] | None = opt(None, "Test prefixes.")
    train_data_weights: list[float] | None = opt(None, "Blend weights, one per train_data_paths entry.")
    valid_data_weights: list[float] | None = opt(None, "Blend weights, one per valid_data_paths entry.")
    test_data_weights: list[float] | None = opt(None, "Blend weights, one per test_data_paths entry.")
    split: str = opt("969,30,1", "train,valid,test proportions of data_path, e.g. '969,30,1'.")
    tokenizer_type: str = opt(
        "GPT2BPETokenizer", "Tokenizer class (default as gpt-neox; neox's configs set HFTokenizer).",
        TOKENIZERS,
    )
    vocab_file: str | None = opt(None, "Tokenizer file (HF tokenizer.json, or GPT-2 vocab.json).")
    merge_file: str | None = opt(None, "GPT-2 BPE merges file (GPT2BPETokenizer only).")
    data_impl: str = opt("mmap", "Indexed dataset format ('infer' is read as mmap).", DATA_IMPLS)
    mmap_warmup: bool = opt(False, "Touch the memory-mapped data once at start-up (speed hint).")
    num_workers: int = opt(2, "DataLoader worker processes.")
    eod_mask_loss: bool = opt(False, "Exclude end-of-document tokens from the loss.")

    def split_fractions(self) -> tuple[float, float, float]:
        """`split` as three fractions summing to 1 (missing parts are 0, as Megatron)."""
        parts = [p.strip() for p in str(self.split).replace("/", ",").split(",") if p.strip()]
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"split {self.split!r} must be comma-separated numbers, e.g. '969,30,1'"
            ) from None
        if not 1 <= len(nums) <= 3 or any(n < 0 for n in nums) or sum(nums) <= 0:
            raise ConfigError(
                f"split {self.split!r} must be 1-3 non-negative numbers with a positive sum, e.g. '969,30,1'"
            )
        nums += [0.0] * (3 - len(nums))
        total = sum(nums)
        return tuple(n / total for n in nums)  # type: ignore[return-value]

    def validate(self) -> None:
        require_choice(self, "tokenizer_type")
        require_choice(self, "data_impl")
        nw = self.num_workers
        if isinstance(nw, bool) or not isinstance(nw, int) or nw < 0:
            raise ConfigError(f"`num_workers` must be an integer >= 0, got {self.num_workers!r}")
        self.split_fractions()
        lists = (self.train_data_paths, self.valid_data_paths, self.test_data_paths)
        if self.data_path is not None and any(p is not None for p in lists):
            raise ConfigError(
                "set either data_path (with split) or train/valid/test_data_paths, not both"
            )
        for name in ("train", "valid", "test"):
            paths = getattr(self, f"{name}_data_paths")
            weights = getattr(self, f"{name}_data_weights")
            if weights is None:
                continue
            if paths is None or len(weights) != len(paths):
                raise ConfigError(
                    f"{name}_data_weights has {len(weights)} entries but {name}_data_paths has "
                    f"{0 if paths is None else len(paths)}; give one weight per path"
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(f"{name}_data_weights must be non-negative with a positive sum: {weights}")
        if self.tokenizer_type == "GPT2BPETokenizer" and self.vocab_file and not self.merge_file:
            raise ConfigError("GPT2BPETokenizer needs merge_file as well as vocab_file")
