"""Sampling filters against a direct per-row reference."""

import pytest
import torch

from neox.inference.sampling import SamplingParams, filter_logits, sample_next


def _reference_filter(row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Tokens kept, computed the slow obvious way on one row."""
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))
    keep = order[:top_k] if top_k else order
    probs = torch.softmax(torch.tensor([float(row[i]) for i in keep]), dim=0).tolist()
    kept, mass = [], 0.0
    for i, p in zip(keep, probs):
        if mass >= top_p:
            break
        kept.append(i)
        mass += p
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8), (1, 0.9), (0, 0.999)])
def test_filter_matches_reference(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    out = filter_logits(logits, top_k, top_p)
    for r in range(4):
        kept = {i for i in range(50) if torch.isfinite(out[r, i])}
        if top_p < 1.0:
            # renormalise as the reference does (top-k first, then nucleus over the survivors)
            ref = _reference_filter(logits[r], top_k, top_p)
        else:
            ref = set(torch.topk(logits[r], top_k).indices.tolist()) if top_k else set(range(50))
        assert kept == ref
        assert torch.equal(out[r][list(kept)], logits[r][list(kept)])


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    assert sample_next(logits, SamplingParams(temperature=0)).tolist() == [1, 0]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    p = SamplingParams(temperature=1.0, top_k=2)
    a = [sample_next(logits, p, g1).tolist() for _ in range(20)]
    b = [sample_next(logits, p, g2).tolist() for _ in range(20)]
    assert a == b
    assert all(x[0] in (1, 2) and x[1] in (0, 2) for x in a)  # top-2 only


def test_bad_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
