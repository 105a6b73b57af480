"""jllm.generate(logprobs=N): each token's log-probability and the N most likely alternatives,
against a float32 full forward over the finished sequence (an independent reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jllm
from jllm.model import forward, init_cache
from jllm.speculative import PromptLookup, Speculative


def _log_softmax(m, seq: list[int], T: int = 64) -> np.ndarray:
    """[T, V] log-probabilities after each token of seq (padded to T: causal, so exact)."""
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :len(seq)] = seq
    lg, _ = jax.jit(forward, static_argnames="cfg")(m.params, jnp.asarray(tokens),
                                                      init_cache(m.cfg, 1, T, jnp.float32), cfg=m.cfg)
    return np.asarray(jax.nn.log_softmax(lg[0], axis=-1))


def _check_against_reference(m, prompt: list[int], entries, n: int) -> None:
    ids = [t for t, _, _ in entries]
    ref = _log_softmax(m, prompt + ids)
    for k, (tok, lp, top) in enumerate(entries):
        row = ref[len(prompt) - 1 + k]
        assert lp == pytest.approx(row[tok], abs=1e-4), k
        assert len(top) == n
        assert [t for t, _ in top] == np.argsort(-row, kind="stable")[:n].tolist(), k
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:n], atol=1e-4)


def test_logprobs_are_the_models_before_penalties_and_sampling(tiny_model_no_tokenizer):
    """Two rows of different lengths, sampled at temperature 1.2 with top-k and a frequency
    penalty, over more than one decode chunk: every entry is the plain model's log-softmax at
    that position (penalties, bias and the sampling cuts do not change it), and the entries'
    tokens are the completion's."""
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 500, 5).tolist(), rng.integers(3, 500, 11).tolist()]
    outs = jllm.generate(m, prompts, max_new_tokens=19, temperature=1.2, top_k=40, seed=7, stop_token_ids=[],
                         frequency_penalty=0.7, logit_bias={9: 3.0}, logprobs=4)
    for prompt, out in zip(prompts, outs):
        assert len(out.tokens) == 19 and [t for t, _, _ in out.logprobs] == out.tokens
        _check_against_reference(m, prompt, out.logprobs, 4)
    # Asking for logprobs changes no token.
    plain = jllm.generate(m, prompts, max_new_tokens=19, temperature=1.2, top_k=40, seed=7, stop_token_ids=[],
                          frequency_penalty=0.7, logit_bias={9: 3.0})
    assert [o.tokens for o in plain] == [o.tokens for o in outs]
    assert all(o.logprobs is None for o in plain)


def test_greedy_tokens_are_their_rows_most_likely_and_zero_alternatives_work(tiny_model_no_tokenizer):
    m = tiny_model_no_tokenizer
    [out] = jllm.generate(m, [[1, 17, 4, 250]], max_new_tokens=10, stop_token_ids=[], logprobs=0)
    assert [t for t, _, _ in out.logprobs] == out.tokens
    assert all(top == [] for _, _, top in out.logprobs)
    [wide] = jllm.generate(m, [[1, 17, 4, 250]], max_new_tokens=10, stop_token_ids=[], logprobs=20)
    for (tok, lp, top), (tok0, lp0, _) in zip(wide.logprobs, out.logprobs):
        assert tok == tok0 == top[0][0] and lp == pytest.approx(top[0][1]) and lp == pytest.approx(lp0)
        assert len(top) == 20 and all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    _check_against_reference(m, [1, 17, 4, 250], wide.logprobs, 20)


def test_a_stop_tokens_logprob_is_the_last_entry_and_streams(tiny_model):
    """Stopping on a token id: the token is not among the tokens, but its entry is the last one
    (as the engine and OpenAI report it); the streamed deltas carry exactly the entries."""
    m = tiny_model
    prompt = [1, 40, 41, 42]
    [plain] = jllm.generate(m, [prompt], max_new_tokens=14, stop_token_ids=[], logprobs=2)
    stop = plain.tokens[9]
    first = plain.tokens.index(stop)
    seen = []
    [out] = jllm.generate(m, [prompt], max_new_tokens=14, stop_token_ids=[stop], logprobs=2,
                          stream=lambda d: seen.append(d))
    assert out.finish_reason == "stop" and out.tokens == plain.tokens[:first]
    assert [t for t, _, _ in out.logprobs] == plain.tokens[:first + 1]
    np.testing.assert_allclose([lp for _, lp, _ in out.logprobs], [lp for _, lp, _ in plain.logprobs[:first + 1]],
                               atol=1e-6)
    _check_against_reference(m, prompt, out.logprobs, 2)
    assert [e for d in seen for e in d.logprobs] == out.logprobs
    assert sum((d.token_ids for d in seen), []) == out.tokens
    assert "".join(d.text for d in seen) == out.text


def test_stop_strings_end_the_entries_with_the_tokens(tiny_model):
    """A stop string: the entries end at the token that completed it, as the tokens do."""
    m = tiny_model
    [plain] = jllm.generate(m, ["The cat"], max_new_tokens=16, stop_token_ids=[])
    # The text of two tokens from the fourth on that holds a letter: a stop string inside the output.
    texts = [m.tokenizer.decode_after(plain.tokens[k], plain.tokens[k + 1:k + 3]).strip() for k in range(3, 14)]
    stop = next(t for t in texts if any(c.isalpha() for c in t))
    [out] = jllm.generate(m, ["The cat"], max_new_tokens=16, stop_token_ids=[], stop=[stop], logprobs=1)
    assert out.finish_reason == "stop" and stop not in out.text
    assert 0 < len(out.tokens) < 16 and out.tokens == plain.tokens[:len(out.tokens)]
    assert [t for t, _, _ in out.logprobs] == out.tokens


def test_min_p_one_is_greedy_and_bad_min_p_is_refused(tiny_model_no_tokenizer):
    """min_p (sampling, not logprobs, but checked here with the other generate options): 1 keeps
    only the most likely token, so a hot temperature samples the greedy tokens."""
    m = tiny_model_no_tokenizer
    [greedy] = jllm.generate(m, [[1, 8, 9]], max_new_tokens=12, stop_token_ids=[])
    [hot] = jllm.generate(m, [[1, 8, 9]], max_new_tokens=12, stop_token_ids=[], temperature=3.0, min_p=1.0, seed=4)
    assert hot.tokens == greedy.tokens
    for bad, error in [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.1", TypeError)]:
        with pytest.raises(error, match="min_p="):
            jllm.generate(m, [[1, 2]], max_new_tokens=2, temperature=1.0, min_p=bad)


def test_bad_logprobs_are_refused_naming_the_value(tiny_model_no_tokenizer):
    m = tiny_model_no_tokenizer
    for bad, error in [(-1, ValueError), (21, ValueError), (2.0, ValueError), (True, TypeError),
                       ("3", TypeError)]:
        with pytest.raises(error, match=r"logprobs="):
            jllm.generate(m, [[1, 2]], max_new_tokens=2, logprobs=bad)
    with pytest.raises(ValueError, match="logprobs=2: logprobs are not supported with speculative"):
        jllm.generate(m, [[1, 2]], max_new_tokens=2, logprobs=2,
                      speculative=Speculative(PromptLookup(2), 2))
