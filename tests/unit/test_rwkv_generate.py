"""RNN-mode generation for RWKV: greedy equals transformers' RwkvForCausalLM.generate, a batch equals its rows
alone, the fused stepper equals forward_rnn, and a saved state resumes exactly (sampling included)."""

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from neox.checkpoint.rwkv_convert import hf_config_to_neox, hf_to_neox_state_dict  # noqa: E402
from neox.inference.rnn import RNNRunner, load_state, rnn_generate_batch, save_state  # noqa: E402
from neox.inference.sampling import SamplingParams  # noqa: E402
from neox.models import CausalLM  # noqa: E402

PROMPTS = [[5, 17, 3, 99, 42, 7], [11], [250, 1, 2, 3]]
EOS = 300


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=301, hidden_size=64, num_hidden_layers=3, bos_token_id=EOS, eos_token_id=EOS)).eval()
    with torch.no_grad():  # random everything, so greedy paths are not degenerate
        for name, p in hf.named_parameters():
            if "time_decay" in name:
                p.uniform_(-3, 1)
            elif "time_mix" in name:
                p.uniform_(0, 1)
            elif "ln" not in name:
                p.copy_(torch.randn_like(p) * 2 / p.shape[-1] ** 0.5)
    cfg = hf_config_to_neox(hf.config)
    lm = CausalLM.from_state_dict(cfg.model, hf_to_neox_state_dict(hf.state_dict(), cfg)).eval()
    return hf, lm


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                          pad_token_id=EOS)[0, len(prompt):].tolist()
    return out[: out.index(EOS)] if EOS in out else out


def test_greedy_matches_hf_generate(models):
    hf, lm = models
    res = rnn_generate_batch(lm, PROMPTS, max_new_tokens=16, params=SamplingParams(temperature=0), eod_id=EOS)
    for prompt, got in zip(PROMPTS, res.tokens):
        assert got == hf_greedy(hf, prompt, 16)
    assert any(len(t) >= 8 for t in res.tokens)  # not all stopped at once


def test_fused_and_forward_rnn_agree_when_sampling(models):
    _, lm = models
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    a = rnn_generate_batch(RNNRunner(lm), PROMPTS, max_new_tokens=12, params=params, seed=7)
    b = rnn_generate_batch(RNNRunner(lm, fused=False), PROMPTS, max_new_tokens=12, params=params, seed=7)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons == ["length"] * 3


def test_save_and_resume_is_exact(models, tmp_path):
    _, lm = models
    params = SamplingParams(temperature=1.0, top_k=40)
    g = torch.Generator().manual_seed(3)
    full = rnn_generate_batch(lm, PROMPTS, max_new_tokens=14, params=params, generator=g)
    g = torch.Generator().manual_seed(3)
    first = rnn_generate_batch(lm, PROMPTS, max_new_tokens=6, params=params, generator=g, return_state=True)
    save_state(tmp_path / "s.safetensors", first.state, first.next_logits, g)
    saved = load_state(tmp_path / "s.safetensors", lm)
    g2 = torch.Generator()
    g2.set_state(saved.rng)
    rest = rnn_generate_batch(lm, [[]] * 3, max_new_tokens=8, params=params, generator=g2, state=saved.state,
                              logits=saved.logits)
    assert [a + b for a, b in zip(first.tokens, rest.tokens)] == full.tokens

    # the saved state is what parallel mode computes over prompt + generated tokens (independent path)
    for r, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt + first.tokens[r]])
        logits, state = lm.model(ids, return_state=True)
        for ours, ref in zip(saved.state, state):
            torch.testing.assert_close(ours[r: r + 1], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(saved.logits[r], logits[0, -1, :lm.cfg.vocab_size], rtol=1e-4, atol=1e-4)


def test_state_of_a_row_ended_early_stops_at_its_last_token(models):
    _, lm = models
    greedy = SamplingParams(temperature=0)
    free = rnn_generate_batch(lm, PROMPTS, max_new_tokens=20, params=greedy)
    eod = next(t for i, t in enumerate(free.tokens[0]) if i >= 3 and t not in free.tokens[0][:i])
    res = rnn_generate_batch(lm, PROMPTS, max_new_tokens=20, params=greedy, eod_id=eod, return_state=True)
    assert res.finish_reasons[0] == "eod" and "length" in res.finish_reasons
    for r, why in enumerate(res.finish_reasons):
        consumed = PROMPTS[r] + res.tokens[r] + ([eod] if why == "eod" else [])
        logits, state = lm.model(torch.tensor([consumed]), return_state=True)
        for ours, ref in zip(res.state, state):
            torch.testing.assert_close(ours[r: r + 1], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.next_logits[r], logits[0, -1, :lm.cfg.vocab_size], rtol=1e-4, atol=1e-4)


def test_errors(models, tmp_path):
    _, lm = models
    with pytest.raises(ValueError, match="empty prompt"):
        rnn_generate_batch(lm, [[]], max_new_tokens=2)
    st = lm.model.init_state(2)
    with pytest.raises(ValueError, match="one state row per prompt"):
        rnn_generate_batch(lm, [[1]], max_new_tokens=2, state=st)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an RWKV state file"):
        load_state(tmp_path / "x.safetensors")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_cpp_step_matches_forward_rnn(models, threads, batch, monkeypatch):
    """The one-call C++ step (the default, when it builds) and the torch step both equal the model's
    forward_rnn, state included, over several steps, single- and multi-threaded."""
    monkeypatch.setenv("NEOX_RWKV_STEP_IMPL", "cpp")
    from neox.inference.rnn import RWKVStepper
    from neox.ops import rwkv_step
    from neox.ops.build import ExtensionBuildError

    _, lm = models
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, slow = RWKVStepper(lm), RWKVStepper(lm)
        try:
            rwkv_step.load()
            built = rwkv_step._impl() != "torch"
        except ExtensionBuildError:
            built = False
        assert (fast._cpp is not None) == built  # the C++ step is used wherever it builds (unless forced off)
        slow._cpp = None
        g = torch.Generator().manual_seed(batch)
        mstate, states = None, [fast.init_state(batch), slow.init_state(batch)]
        for _ in range(5):
            ids = torch.randint(0, lm.cfg.vocab_size, (batch,), generator=g)
            with torch.inference_mode():
                ref, mstate = lm.model.forward_rnn(ids, mstate)
            for st, s in zip((fast, slow), states):
                logits, _ = st.step(ids, s)
                torch.testing.assert_close(logits, ref[:, : lm.cfg.vocab_size], rtol=1e-4, atol=1e-4)
                for ours, want in zip(st.to_model_state(s), mstate):
                    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(old)
