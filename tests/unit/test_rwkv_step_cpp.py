"""The C++ RWKV-4 step (csrc/rwkv_step, the default RNN step on float32 CPU) against the model's forward_rnn:
every gemv kernel (AVX-512, AVX2, plain), batches that span several passes, thread counts above the core
count, odd sizes (a partial tile, an odd input width), a forked child, bad input."""

import multiprocessing as mp
import os

import pytest
import torch

from neox.config import NeoXConfig
from neox.inference import rnn
from neox.inference.rnn import RWKVStepper
from neox.models import CausalLM
from neox.ops import rwkv_step
from neox.ops.build import ExtensionBuildError


def _ext():
    try:
        return rwkv_step.load()
    except ExtensionBuildError as e:
        pytest.skip(f"the C++ RWKV step does not build here: {e}")


@pytest.fixture(scope="module")
def lm():
    cfg = NeoXConfig.from_dict({"model_type": "rwkv", "num_layers": 2, "hidden_size": 29, "vocab_size": 37,
                                "no_weight_tying": True, "seq_length": 64, "max_position_embeddings": 64})
    torch.manual_seed(0)
    m = CausalLM.from_config(cfg.model).eval()
    with torch.no_grad():  # neox init zeroes some matrices: make every weight matter
        for name, p in m.model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            elif "time_decay" in name:
                p.uniform_(-3, 1)
            elif "time_mix" in name:
                p.uniform_(0, 1)
    return m


def _reference(lm, ids_seq, batch):
    """forward_rnn over the token sequence: a list of (logits [B, V], model-format state)."""
    out, state = [], None
    with torch.inference_mode():
        for ids in ids_seq:
            logits, state = lm.model.forward_rnn(ids, state)
            out.append((logits[:, : lm.cfg.vocab_size].clone(), [s.clone() for s in state]))
    return out


def _run(stepper, ids_seq, batch):
    state = stepper.init_state(batch)
    out = []
    for ids in ids_seq:
        logits, state = stepper.step(ids, state)
        out.append((logits.clone(), stepper.to_model_state(state)))
    return out


def _ids(lm, batch, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, lm.cfg.vocab_size, (batch,), generator=g) for _ in range(steps)]


def _assert_same(got, want):
    for (lg, st), (lw, sw) in zip(got, want):
        torch.testing.assert_close(lg, lw, rtol=1e-5, atol=1e-5)
        for a, b in zip(st, sw):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _supported(isa):
    if isa == "generic":
        return True
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    return {"avx512": {"avx512f", "avx512bw"}, "avx2": {"avx2", "fma"}}[isa] <= flags


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("batch", [1, 3, 6])
def test_every_kernel_matches_forward_rnn(lm, isa, batch, monkeypatch):
    _ext()
    if not _supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("NEOX_RWKV_STEP_ISA", isa)
    stepper = RWKVStepper(lm)
    assert stepper._cpp is not None and stepper._cpp.isa == isa
    ids = _ids(lm, batch)
    assert batch <= rnn.CPP_MAX_BATCH  # batch 6 is two passes over the weights (4 + 2 rows), still C++
    got = _run(stepper, ids, batch)
    _assert_same(got, _reference(lm, ids, batch))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(lm, threads, monkeypatch):
    """More pool threads than cores (the pool must not deadlock or lose chunks when threads are descheduled)."""
    _ext()
    monkeypatch.setattr(rwkv_step, "MAX_THREADS", threads)
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        stepper = RWKVStepper(lm)
    finally:
        torch.set_num_threads(old)
    assert stepper._cpp.threads == threads
    ids = _ids(lm, 2, steps=30, seed=threads)
    _assert_same(_run(stepper, ids, 2), _reference(lm, ids, 2))


def test_default_is_the_cpp_step_and_torch_forces_it_off(lm, monkeypatch):
    _ext()
    monkeypatch.delenv("NEOX_RWKV_STEP_IMPL", raising=False)
    assert RWKVStepper(lm)._cpp is not None
    monkeypatch.setenv("NEOX_RWKV_STEP_IMPL", "torch")
    assert RWKVStepper(lm)._cpp is None
    monkeypatch.setenv("NEOX_RWKV_STEP_IMPL", "fast")
    with pytest.raises(ValueError, match="NEOX_RWKV_STEP_IMPL='fast'"):
        RWKVStepper(lm)


def test_unknown_kernel_name_is_one_clear_error(lm, monkeypatch):
    _ext()
    monkeypatch.setenv("NEOX_RWKV_STEP_ISA", "neon")
    with pytest.raises(RuntimeError, match="unknown kernel 'neon'"):
        RWKVStepper(lm)


def test_bad_token_and_state_are_rejected(lm):
    _ext()
    stepper = RWKVStepper(lm)
    state = stepper.init_state(1)
    with pytest.raises(RuntimeError, match="token id 1000000 out of range"):
        stepper._cpp.step(torch.tensor([10**6]), *state)
    with pytest.raises(RuntimeError, match=r"state tensors must be \[L=2, B=2"):
        stepper._cpp.step(torch.tensor([1, 2]), *state)


def _child(stepper, ids, queue):
    torch.set_num_threads(1)
    queue.put([t.tolist() for t in _run(stepper, ids, 1)[-1][0]])


def test_forked_child_steps_without_the_parents_workers(lm):
    """After fork() the pool's worker threads exist only in the parent: the child must run inline, not hang."""
    _ext()
    stepper = RWKVStepper(lm)
    ids = _ids(lm, 1, steps=3)
    want = _run(stepper, ids, 1)[-1][0]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(stepper, ids, queue))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def lm_bf16(lm):
    """The same model with every weight rounded to bf16 (stored float32): a checkpoint released in bf16."""
    import copy

    m = copy.deepcopy(lm)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_exact_bf16_storage_is_bit_identical(lm_bf16, isa, monkeypatch):
    """Matrices whose float32 values are all bf16 are stored in half the bytes; logits and state stay
    bit-identical to the float32 storage, and still match forward_rnn."""
    _ext()
    if not _supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("NEOX_RWKV_STEP_ISA", isa)
    half = RWKVStepper(lm_bf16)
    monkeypatch.setenv("NEOX_RWKV_STEP_EXACT_BF16", "0")
    full = RWKVStepper(lm_bf16)
    assert half._cpp.bf16_bytes == half._cpp.packed_bytes > 0 and full._cpp.bf16_bytes == 0
    assert half._cpp.packed_bytes < 0.56 * full._cpp.packed_bytes  # half, plus padding to an even width
    ids = _ids(lm_bf16, 3, steps=5)
    got, want = _run(half, ids, 3), _run(full, ids, 3)
    for (lg, st), (lw, sw) in zip(got, want):
        assert torch.equal(lg, lw) and all(torch.equal(a, b) for a, b in zip(st, sw))
    _assert_same(got, _reference(lm_bf16, ids, 3))


def test_one_non_bf16_value_keeps_that_matrix_float32(lm_bf16):
    import copy

    _ext()
    m = copy.deepcopy(lm_bf16)
    with torch.no_grad():
        w = m.model.lm_head.weight
        w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf")))  # a low bit set
    stepper = RWKVStepper(m)
    assert 0 < stepper._cpp.bf16_bytes < stepper._cpp.packed_bytes
    ids = _ids(m, 1, steps=3)
    _assert_same(_run(stepper, ids, 1), _reference(m, ids, 1))
