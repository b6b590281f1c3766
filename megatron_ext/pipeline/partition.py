"""Which global layers each pipeline rank holds, per virtual chunk.

Megatron's interleaved assignment: the model is cut into ``pp * vpp`` consecutive *model stages*;
stage ``m = chunk * pp + pp_rank`` lives on ``pp_rank`` as its local chunk ``chunk``. With vpp = 1
that is the plain contiguous split. Stage ``m`` feeds stage ``m + 1``, which is on the next pp rank
(wrapping from the last rank back to rank 0 one chunk later).
"""

from __future__ import annotations

from collections.abc import Sequence

METHODS = ("uniform", "parameters")


def stage_of(pp_size: int, pp_rank: int, chunk: int) -> int:
    """Global model-stage index of ``chunk`` on ``pp_rank``."""
    return chunk * pp_size + pp_rank


def rank_and_chunk_of(pp_size: int, stage: int) -> tuple[int, int]:
    """Inverse of :func:`stage_of`: (pp_rank, chunk) holding model stage ``stage``."""
    chunk, rank = divmod(stage, pp_size)
    return rank, chunk


def _split_uniform(num_layers: int, num_stages: int) -> list[int]:
    if num_layers % num_stages != 0:
        raise ValueError(
            f"partition_layers(method='uniform'): num_layers={num_layers} is not divisible by "
            f"pp_size*vpp_size={num_stages}; choose sizes that divide the layer count or use "
            "method='parameters' with per-layer weights"
        )
    return [num_layers // num_stages] * num_stages


def _split_balanced(weights: Sequence[float], num_stages: int, first_extra: float, last_extra: float) -> list[int]:
    """Contiguous split of ``weights`` into ``num_stages`` non-empty parts minimising the heaviest part.

    Exact dynamic programme, O(stages * layers^2): best[s][i] is the smallest possible maximum stage
    weight when the first ``i`` layers fill the first ``s`` stages. Stage 0 also carries
    ``first_extra`` (the embedding) and the last stage ``last_extra`` (the head).
    """
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))

    def cost(stage: int, lo: int, hi: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == num_stages - 1 else 0.0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        # stage s-1 ends at layer i; at least one layer per stage, room for the stages after it
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                val = max(best[s - 1][j], cost(s - 1, j, i))
                if val < best[s][i]:  # strict: ties keep the earliest cut, deterministic
                    best[s][i], cut[s][i] = val, j
    sizes, i = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def partition_layers(
    num_layers: int,
    pp_size: int,
    vpp_size: int = 1,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    first_extra: float = 0.0,
    last_extra: float = 0.0,
) -> list[list[tuple[int, int]]]:
    """Global ``(start, stop)`` layer range of every virtual chunk of every pp rank.

    Returns ``result[pp_rank][chunk] = (start, stop)``; model stage ``chunk * pp_size + pp_rank``
    holds layers ``start..stop-1``. ``method="uniform"`` needs ``num_layers % (pp*vpp) == 0``;
    ``method="parameters"`` balances ``weights`` (one per layer, e.g. parameter counts), with
    ``first_extra``/``last_extra`` added to the first/last model stage (embedding / head).
    """
    for name, val in (("num_layers", num_layers), ("pp_size", pp_size), ("vpp_size", vpp_size)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"partition_layers: {name} must be a positive integer, got {val!r}")
    num_stages = pp_size * vpp_size
    if num_layers < num_stages:
        raise ValueError(
            f"partition_layers: {num_layers} layers cannot fill pp_size*vpp_size={num_stages} stages "
            "(each stage needs at least one layer); lower pp/vpp or add layers"
        )
    if method == "uniform":
        sizes = _split_uniform(num_layers, num_stages)
    elif method == "parameters":
        if weights is None or len(weights) != num_layers:
            got = "None" if weights is None else f"{len(weights)} values"
            raise ValueError(
                f"partition_layers(method='parameters') needs weights with one value per layer "
                f"({num_layers}), got {got}"
            )
        if any(float(w) < 0 for w in weights) or first_extra < 0 or last_extra < 0:
            raise ValueError("partition_layers: weights, first_extra and last_extra must be non-negative")
        sizes = _split_balanced(weights, num_stages, first_extra, last_extra)
    else:
        raise ValueError(f"partition_layers: unknown method {method!r}; known methods: {', '.join(METHODS)}")

    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    assert start == num_layers
    return [[bounds[stage_of(pp_size, r, c)] for c in range(vpp_size)] for r in range(pp_size)]
