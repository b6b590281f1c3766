"""Weight initialisers with gpt-neox's names (megatron/model/init_functions.py), and per-module seeding.

An init method is a callable that fills a tensor in place from torch's current default RNG; the
parallel layers call it on the FULL master weight and keep their slice, so any TP layout consumes
the RNG identically. `seeded` goes one step further: each module is built under its own RNG seed
derived from (init seed, slot), so a pipeline stage holding layers 2-3 draws exactly the numbers a
single process draws for layers 2-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def normal_init(std: float) -> InitMethod:
    return lambda t: torch.nn.init.normal_(t, mean=0.0, std=std)


def init_method_std(name: str, *, hidden_size: int, num_layers: int, init_method_std: float = 0.02) -> float:
    """The std of a gpt-neox init method (all of ours are zero-mean normals)."""
    if name == "normal":
        return init_method_std
    if name == "scaled_normal":
        return init_method_std / math.sqrt(2.0 * num_layers)
    if name == "small_init":  # Nguyen & Salazar, "Transformers without Tears"
        return math.sqrt(2.0 / (5.0 * hidden_size))
    if name == "wang_init":  # Wang & Komatsuzaki, as used for GPT-J / GPT-NeoX-20B
        return 2.0 / num_layers / math.sqrt(hidden_size)
    raise ValueError(
        f"unknown init method {name!r}; use one of normal, scaled_normal, small_init, wang_init "
        "(model config keys init_method / output_layer_init_method)"
    )


def get_init_method(name: str, cfg) -> InitMethod:
    """Init method for a ModelConfig's `init_method` / `output_layer_init_method` value."""
    return normal_init(init_method_std(name, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                       init_method_std=cfg.init_method_std))


def derive_seed(init_seed: int, slot: int) -> int:
    """A distinct, stable seed per (init seed, slot); slots: 0 embedding, 1 head, 2 + i layer i."""
    return (int(init_seed) * 1_000_003 + int(slot) * 7_919 + 17) % (2**62)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with the CPU default RNG seeded to `seed`, restoring the caller's state after.

    The CPU generator is the one that matters: megatron_ext builds every master weight on CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
