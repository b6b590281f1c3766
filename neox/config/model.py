"""ModelConfig: the architecture of a GPT-NeoX (or RWKV) model, with gpt-neox's key names."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .fields import opt, require_choice, require_positive

MODEL_TYPES = ("gpt_neox", "rwkv")
POS_EMBS = ("rotary",)
NORMS = ("layernorm",)
ACTIVATIONS = ("gelu",)
INIT_METHODS = ("normal", "small_init", "wang_init")


@dataclass
class ModelConfig:
    """Shapes and architecture switches of the network (no parallelism, no training settings)."""

    model_type: str = opt("gpt_neox", "Model family.", MODEL_TYPES)
    num_layers: int | None = opt(None, "Number of transformer (or RWKV) blocks.")
    hidden_size: int | None = opt(None, "Model width D.")
    num_attention_heads: int | None = opt(None, "Attention heads per layer; hidden_size must divide by it.")
    seq_length: int | None = opt(None, "Training sequence length in tokens.")
    max_position_embeddings: int | None = opt(
        None, "Longest position the model supports; defaults to seq_length; must be >= seq_length."
    )
    intermediate_size: int | None = opt(None, "MLP width F; None means 4 * hidden_size.")
    vocab_size: int | None = opt(
        None,
        "The tokenizer's real vocabulary size (neox extension). Used by the planner and when no "
        "tokenizer is at hand; the embedding is padded with make_vocab_size_divisible_by.",
    )
    make_vocab_size_divisible_by: int = opt(
        128, "Pad the vocabulary to a multiple of this times the tensor-parallel size."
    )
    pos_emb: str = opt("rotary", "Position embedding type (only rotary is supported).", POS_EMBS)
    rotary_pct: float = opt(1.0, "Fraction of each head's dimensions that get rotary embeddings, in (0, 1].")
    rotary_emb_base: int = opt(10000, "Base of the rotary frequencies.")
    gpt_j_residual: bool = opt(
        False, "Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)) instead of sequential blocks."
    )
    norm: str = opt("layernorm", "Normalisation layer (only layernorm is supported).", NORMS)
    layernorm_epsilon: float = opt(1e-5, "Epsilon of every LayerNorm.")
    no_weight_tying: bool = opt(
        False, "True: separate output head. False: the output head reuses the input embedding."
    )
    init_method: str = opt("small_init", "Init of most weights.", INIT_METHODS)
    output_layer_init_method: str = opt(
        "wang_init", "Init of the layers that write into the residual stream.", INIT_METHODS
    )
    init_method_std: float = opt(0.02, "Std of the 'normal' init method.")
    activation: str = opt("gelu", "MLP activation (only gelu is supported).", ACTIVATIONS)
    hidden_dropout: float = opt(0.0, "Dropout on residual-branch outputs.")
    attention_dropout: float = opt(0.0, "Dropout on attention probabilities.")

    def __post_init__(self) -> None:
        if self.max_position_embeddings is None and self.seq_length is not None:
            self.max_position_embeddings = self.seq_length

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        """MLP width: intermediate_size, or 4 * hidden_size as gpt-neox."""
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated dimensions per head (gpt-neox: int(head_dim * rotary_pct))."""
        return int(self.head_dim * self.rotary_pct)

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        """vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp_size (as gpt-neox)."""
        if self.vocab_size is None:
            raise ConfigError("vocab_size is not set: set `vocab_size` in the config or load a tokenizer")
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError on the first inconsistent value."""
        require_choice(self, "model_type")
        require_positive(self, "num_layers", "hidden_size", "seq_length")
        # RWKV-4 has no attention heads; every other family needs them.
        require_positive(self, "num_attention_heads", optional=self.model_type == "rwkv")
        require_positive(self, "max_position_embeddings", "intermediate_size", "vocab_size",
                         "make_vocab_size_divisible_by", "rotary_emb_base", optional=True)
        for key in ("pos_emb", "norm", "activation", "init_method", "output_layer_init_method"):
            require_choice(self, key)
        if self.num_attention_heads is not None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not (0.0 < float(self.rotary_pct) <= 1.0):
            raise ConfigError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.model_type == "gpt_neox" and (self.rotary_dim % 2 or self.rotary_dim < 2):
            raise ConfigError(
                f"rotary dims per head, int(head_dim {self.head_dim} * rotary_pct {self.rotary_pct}) = "
                f"{self.rotary_dim}, must be even and >= 2; adjust rotary_pct"
            )
        if self.max_position_embeddings is not None and self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"seq_length ({self.seq_length}) exceeds max_position_embeddings "
                f"({self.max_position_embeddings}); raise max_position_embeddings or shorten seq_length"
            )
        if self.layernorm_epsilon <= 0:
            raise ConfigError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon}")
        if self.init_method_std <= 0:
            raise ConfigError(f"init_method_std must be > 0, got {self.init_method_std}")
        for key in ("hidden_dropout", "attention_dropout"):
            if not (0.0 <= float(getattr(self, key)) < 1.0):
                raise ConfigError(f"`{key}` must be in [0, 1), got {getattr(self, key)}")
