"""neox: GPT-NeoX and RWKV training on tensor, sequence, pipeline and data parallelism.

The public entry points are imported lazily, so ``import neox.config`` stays free of torch.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a neox checkpoint (any layout) or a Hugging Face GPT-NeoX directory into one process.

    Returns a ``torch.nn.Module`` in eval mode: ``model(input_ids)`` with ``input_ids`` a LongTensor
    [B, T] gives logits [B, T, V], V the tokenizer's real vocabulary (padding removed).
    """
    from neox.checkpoint.loading import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
