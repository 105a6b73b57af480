import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm import sampling
from jllm.sampling import Sampling, sample

V = 64
DRAWS = 4096
sample_jit = jax.jit(sample)


def _logits(seed: int = 0, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, (rows, V)).astype(np.float32)


def _draw(row: np.ndarray, s: Sampling, seed: int = 0) -> np.ndarray:
    """DRAWS samples from one row of logits, as one batch (each row draws independently)."""
    batch = jnp.asarray(np.repeat(row[None], DRAWS, 0))
    return np.asarray(sample_jit(batch, jax.random.key(seed), s))


def _rows(temperature, top_k=None, top_p=None) -> Sampling:
    return Sampling.make(DRAWS, temperature, top_k, top_p)


def test_sampling_make_defaults_mean_no_cut():
    s = Sampling.make(3)
    assert np.asarray(s.temperature).tolist() == [0, 0, 0]
    assert np.asarray(s.top_k).tolist() == [0, 0, 0]
    assert np.asarray(s.top_p).tolist() == [1, 1, 1]
    assert np.asarray(s.min_p).tolist() == [0, 0, 0]


@pytest.mark.parametrize("top_k, top_p", [(None, None), (3, 0.5)], ids=["plain", "with_cuts"])
def test_temperature_zero_is_argmax(top_k, top_p):
    logits = _logits(1, rows=16)
    got = sample_jit(jnp.asarray(logits), jax.random.key(0), Sampling.make(16, 0.0, top_k, top_p))
    assert np.asarray(got).tolist() == np.argmax(logits, -1).tolist()


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_never_samples_outside_the_k_best(k):
    row = _logits(2)[0]
    got = _draw(row, _rows(1.5, top_k=k))
    best = set(np.argsort(-row)[:k].tolist())
    assert set(got.tolist()) <= best
    if k > 1:  # and it does sample, not just take the argmax
        assert len(set(got.tolist())) > 1


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_samples_only_the_smallest_prefix_reaching_p(p):
    row = _logits(3)[0]
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)   # smallest prefix with mass >= p
    assert abs(np.cumsum(probs[order])[n - 1] - p) > 1e-3       # not on a float boundary
    allowed = set(order[:n].tolist())
    got = _draw(row, _rows(1.0, top_p=p))
    assert set(got.tolist()) <= allowed
    if n > 1:
        assert len(set(got.tolist())) > 1


def test_top_k_and_top_p_together_keep_the_smaller_set():
    row = _logits(4)[0]
    got = set(_draw(row, _rows(1.0, top_k=2, top_p=0.99)).tolist())
    assert got == set(np.argsort(-row)[:2].tolist())


@pytest.mark.parametrize("temperature, top_k", [(1.0, 2), (2.0, None)], ids=lambda v: f"{v}")
def test_frequencies_match_the_renormalized_distribution(temperature, top_k):
    """A known answer: probabilities (0.5, 0.3, 0.2, tiny...) at temperature T with a top-k cut."""
    p = np.full(V, 1e-9)
    p[[7, 3, 40]] = [0.5, 0.3, 0.2]
    row = np.log(p).astype(np.float32)
    want = p ** (1 / temperature)
    if top_k:
        want[np.argsort(-want)[top_k:]] = 0
    want /= want.sum()
    got = np.bincount(_draw(row, _rows(temperature, top_k=top_k)), minlength=V) / DRAWS
    np.testing.assert_allclose(got, want, atol=0.03)


def test_same_seed_same_tokens_different_seed_differs():
    row = _logits(5)[0]
    s = _rows(1.0)
    a, b, c = _draw(row, s, seed=0), _draw(row, s, seed=0), _draw(row, s, seed=1)
    assert a.tolist() == b.tolist()
    # 4096 independent draws from a spread distribution: two seeds agree on far fewer than all.
    assert np.mean(a == c) < 0.5


def test_each_row_uses_its_own_values():
    """One batch: greedy rows, top_k=1 rows, tiny top_p rows and free rows side by side."""
    row = _logits(6)[0]
    n = DRAWS // 4
    s = Sampling(temperature=jnp.asarray([0.0] * n + [1.0] * 3 * n, jnp.float32),
                 top_k=jnp.asarray([0] * n + [1] * n + [0] * 2 * n, jnp.int32),
                 top_p=jnp.asarray([1.0] * 2 * n + [1e-3] * n + [1.0] * n, jnp.float32),
                 min_p=jnp.zeros((4 * n,), jnp.float32))
    got = _draw(row, s)
    best = int(np.argmax(row))
    assert set(got[:3 * n].tolist()) == {best}
    assert len(set(got[3 * n:].tolist())) > 3


def test_new_sampling_values_do_not_recompile():
    logits = jnp.asarray(_logits(7, rows=5))  # a batch size no other test uses
    # Three programs: all-greedy (static Sampling.greedy, no sort traced), sampling with no cut
    # (static Sampling.filtered False, no sort either) and sampling with cuts.
    sample_jit(logits, jax.random.key(0), Sampling.make(5)).block_until_ready()
    sample_jit(logits, jax.random.key(0), Sampling.make(5, 1.0)).block_until_ready()
    sample_jit(logits, jax.random.key(0), Sampling.make(5, 1.0, top_k=3)).block_until_ready()
    compiled = sample_jit._cache_size()
    for values in [(0.7, 5, None), (1.3, None, 0.8), (2.0, 40, 0.3), (0.0, 1, 1.0)]:
        sample_jit(logits, jax.random.key(values[1] or 1), Sampling.make(5, *values)).block_until_ready()
    assert sample_jit._cache_size() == compiled


def test_top_k_past_int32_means_no_cut():
    """A top_k at or past the vocabulary keeps every token, however large (it is clamped to the
    int32 the sampler reads, not overflowed)."""
    row = _logits(5)[0]
    plain = _draw(row, _rows(1.0))
    for k in (V, 2 ** 31, 10 ** 20):
        np.testing.assert_array_equal(_draw(row, _rows(1.0, top_k=k)), plain)


def test_top_p_that_rounds_to_zero_keeps_the_best_token():
    """top_p = 1e-50 is 0.0 in float32: the nucleus is then the first token alone, never empty
    (an empty nucleus used to cut nothing)."""
    row = _logits(6)[0]
    for p in (1e-50, 1e-6):
        assert set(_draw(row, _rows(1.0, top_p=p)).tolist()) == {int(np.argmax(row))}


@pytest.mark.parametrize("top_p", [None, 1.0], ids=lambda v: f"top_p={v}")
def test_top_p_one_cuts_no_token(top_p):
    """top_p 1 (and None) means no nucleus cut: every token keeps its finite logit, including a
    long tail whose float32 running mass reaches 1 before the end of the sorted vocabulary."""
    from jllm.sampling import _filtered_logits
    logits = np.random.default_rng(0).normal(0, 6, (2, 32000)).astype(np.float32)
    got = np.asarray(_filtered_logits(jnp.asarray(logits), Sampling.make(2, 1.0, None, top_p)))
    assert np.isfinite(got).all()


def _kept(logits: np.ndarray, s: Sampling) -> np.ndarray:
    from jllm.sampling import _filtered_logits
    return np.isfinite(np.asarray(_filtered_logits(jnp.asarray(logits), s)))


@pytest.mark.parametrize("temperature, top_k, min_p", [(1.0, None, 0.05), (0.7, None, 0.2), (1.5, 20, 0.1),
                                                       (1.0, None, 1.0), (2.0, 5, 0.0)])
def test_min_p_keeps_what_hugging_faces_min_p_warper_keeps(temperature, top_k, min_p):
    """Against transformers' own warpers (temperature, top-k, then min-p) on 32 random rows."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper
    logits = _logits(11, rows=32)
    scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(logits))
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if min_p > 0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    expected = np.isfinite(scores.numpy())
    got = _kept(logits, Sampling.make(32, temperature, top_k, None, min_p))
    assert (got == expected).all()
    if 0 < min_p < 1:  # the cut is real: fewer tokens than top-k alone keeps
        assert got.sum() < _kept(logits, Sampling.make(32, temperature, top_k)).sum()


def test_min_p_never_samples_below_its_share_of_the_best():
    row = _logits(12)[0]
    probs = np.exp(row - row.max())
    allowed = set(np.nonzero(probs >= 0.1)[0].tolist())
    assert 2 < len(allowed) < V // 2
    got = _draw(row, Sampling.make(DRAWS, 1.0, None, None, 0.1))
    assert set(got.tolist()) == allowed        # all of them drawn in 4096 tries, none other
    assert (_draw(row, Sampling.make(DRAWS, 3.0, None, None, 1.0)) == np.argmax(row)).all()


def test_the_logit_bias_comes_before_the_penalties_as_in_vllm():
    """A seen token with logit 4 and bias +1 against an unseen one at 2.6, repetition penalty 2:
    bias first gives (4 + 1) / 2 = 2.5 < 2.6 (vLLM's order); bias last would give 3.0."""
    from jllm.sampling import penalize
    lg = jnp.asarray([[4.0, 2.6]])
    out = penalize(lg, jnp.zeros((1, 2), jnp.int32), jnp.zeros(1), jnp.zeros(1), jnp.asarray([2.0]),
                   jnp.asarray([[True, False]]), jnp.asarray([[1.0, 0.0]]))
    np.testing.assert_allclose(np.asarray(out), [[2.5, 2.6]])
    assert int(jnp.argmax(out)) == 1


@pytest.mark.parametrize("V", [32, 100, 513])
def test_unpack_allowed_reads_llguidance_bit_order(V):
    """Bit j of word w is token 32 w + j (llguidance's packed masks, little-endian words)."""
    rng = np.random.default_rng(V)
    words = rng.integers(0, 2**32, size=(3, -(-V // 32)), dtype=np.uint64).astype(np.uint32)
    want = np.unpackbits(words.astype("<u4").view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)
    np.testing.assert_array_equal(np.asarray(sampling.unpack_allowed(jnp.asarray(words), V)), want)
    one = np.zeros((1, -(-V // 32)), np.uint32)
    one[0, (V - 1) // 32] = np.uint32(1) << np.uint32((V - 1) % 32)
    assert np.flatnonzero(np.asarray(sampling.unpack_allowed(jnp.asarray(one), V))).tolist() == [V - 1]


def test_unfiltered_sampling_skips_the_sort_and_draws_the_same_tokens():
    """Sampling.make without top-k, top-p or min-p is static filtered=False: the program has no
    sort, and its draws equal the filtering program's (whose cuts then keep every token)."""
    logits = jnp.asarray(_logits(3, rows=4))
    plain = Sampling.make(4, temperature=0.7)
    assert not plain.filtered and Sampling.make(4, 0.7, top_p=0.9).filtered and Sampling.make(4, 0.7, top_k=5).filtered
    assert Sampling.make(4, 0.7, min_p=0.1).filtered and not Sampling.make(4, 0.7, top_p=1.0).filtered
    full = Sampling(plain.temperature, plain.top_k, plain.top_p, plain.min_p, filtered=True)
    for seed in range(20):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(sample_jit(logits, key, plain)), np.asarray(sample_jit(logits, key, full)))
    assert "sort" not in jax.jit(sample).lower(logits, jax.random.key(0), plain).as_text()
    assert "sort" in jax.jit(sample).lower(logits, jax.random.key(0), full).as_text()
