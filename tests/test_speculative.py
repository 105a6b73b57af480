"""Speculative decoding: greedy output unchanged with every proposer, sampled output exactly the
target's distribution, caches rolled back to what a plain run holds, the CLI helpers and the benchmark.

Shapes stay small (batch <= 4, a 64-slot cache) so each (proposer, k) compiles once.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_model, random_params

import jllm
from jllm import speculative as sp
from jllm.config import LlamaConfig
from jllm.generate import Model, bucket, decode, prefill
from jllm.kvcache import init_cache
from jllm.model import forward, from_flat, to_flat
from jllm.sampling import Sampling

KS = (1, 2, 4, 7)
N = 19  # max_new_tokens: not a multiple of any k + 1, so the length limit lands inside a run


def _prompts(model: Model) -> list[list[int]]:
    """Three rows of different lengths; the third repeats itself, so prompt lookup finds matches."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(3, model.cfg.vocab_size, n).tolist() for n in (5, 11, 4))
    return [a, b, c * 3]


# --- greedy: identical output ------------------------------------------------------------------

def _noisy_copy(model: Model, scale: float, seed: int = 9) -> Model:
    """The model with every weight perturbed by scale x its std: a draft that agrees often, not always."""
    rng = np.random.default_rng(seed)
    flat = {k: np.asarray(v) for k, v in to_flat(model.params).items()}
    flat = {k: v + scale * v.std() * rng.normal(size=v.shape).astype(v.dtype) for k, v in flat.items()}
    return dataclasses.replace(model, params=from_flat({k: jnp.asarray(v) for k, v in flat.items()}, model.cfg))


@pytest.fixture(scope="module")
def proposers(tiny_model):
    return {"draft": sp.DraftModel(_noisy_copy(tiny_model, 0.05)), "self_int8": sp.self_draft(tiny_model, "int8"),
            "prompt_lookup": sp.PromptLookup(3)}


@pytest.fixture(scope="module")
def stops(tiny_model):
    """Stop conditions taken from the plain greedy output so they land mid-sequence: a stop id that
    first appears at token 9 of row 0 and a stop string from the second half of row 1's text."""
    ref = jllm.generate(tiny_model, _prompts(tiny_model), max_new_tokens=N, stop_token_ids=[])
    row0 = ref[0].tokens
    pos = next(i for i in range(9, N) if row0[i] not in row0[:i])
    text = ref[1].text
    start = next(i for i in range(len(text) // 2, len(text) - 3)
                 if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip()
                 and text[i:i + 3] not in ref[0].text + ref[2].text)
    return dict(stop_token_ids=[row0[pos]], stop=[text[start:start + 3]])


@pytest.fixture(scope="module")
def plain(tiny_model, stops):
    return jllm.generate(tiny_model, _prompts(tiny_model), max_new_tokens=N, **stops)


@pytest.mark.parametrize("k", KS, ids=[f"k={k}" for k in KS])
@pytest.mark.parametrize("name", ["draft", "self_int8", "prompt_lookup"])
def test_greedy_output_equals_plain_greedy(tiny_model, proposers, stops, plain, name, k):
    got = jllm.generate(tiny_model, _prompts(tiny_model), max_new_tokens=N, **stops,
                        speculative=sp.Speculative(proposers[name], k))
    assert [r.tokens for r in got] == [r.tokens for r in plain]
    assert [r.text for r in got] == [r.text for r in plain]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in plain]
    for r in got:
        s = r.stats
        assert 0 <= s.acceptance <= 1 and s.draft_tokens_per_step <= k and 1 <= s.tokens_per_step <= k + 1
        assert s.target_steps >= -(-(len(r.tokens) - 1) // (k + 1))


def _first_layer_draft(model: Model) -> Model:
    """The target cut to its first layer (its embeddings, final norm and output kept): a draft of
    another depth that agrees with the target part of the time."""
    cfg = dataclasses.replace(model.cfg, n_layers=1)
    flat = {k: v for k, v in to_flat(model.params).items() if not k.startswith("layers.") or k.startswith("layers.0.")}
    return dataclasses.replace(model, cfg=cfg, params=from_flat(flat, cfg))


@pytest.mark.parametrize("kind", ["shallower", "smaller_tied"])
def test_a_draft_of_another_architecture(tiny_model, tokenizer, kind):
    """A smaller model of the same vocabulary drafts (as Llama-3.2-1B drafts for Llama-3.1-8B):
    the target carries llama3 RoPE scaling; the draft has fewer layers, or another width, head
    layout and tied embeddings. Greedy output equals plain greedy; its cache rolls back in step."""
    from jllm.config import RopeScaling
    scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=32)
    target = make_model(dataclasses.replace(tiny_model.cfg, rope_scaling=scaling, rope_theta=5e5), tokenizer)
    if kind == "shallower":
        draft = _first_layer_draft(target)
    else:
        draft = make_model(dataclasses.replace(target.cfg, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=96,
                                               tie_embeddings=True), tokenizer, seed=5)
    sp.DraftModel(draft).check(target)
    prompts = _prompts(target)
    plain = jllm.generate(target, prompts, max_new_tokens=N, stop_token_ids=[])
    for k in (2, 4):
        got = jllm.generate(target, prompts, max_new_tokens=N, stop_token_ids=[],
                            speculative=sp.Speculative(sp.DraftModel(draft), k))
        assert [r.tokens for r in got] == [r.tokens for r in plain], (kind, k)
        if kind == "shallower":  # the cut model agrees with the target on some tokens
            assert sum(r.stats.acceptance for r in got) > 0, k


def test_the_stops_end_rows_early(plain):
    """The fixture's conditions really stop rows 0 and 1 before the length limit."""
    assert [r.finish_reason for r in plain[:2]] == ["stop", "stop"]
    assert len(plain[0].tokens) == 9 and len(plain[1].tokens) < N


def test_identical_draft_accepts_everything_and_stops_inside_a_run(tiny_model, stops, plain):
    k = 4
    got = jllm.generate(tiny_model, _prompts(tiny_model), max_new_tokens=N, **stops,
                        speculative=sp.Speculative(sp.DraftModel(tiny_model), k))
    assert [r.tokens for r in got] == [r.tokens for r in plain]
    # Runs of k + 1 tokens follow the prefill's token: the stop at token 9 lands inside the second.
    assert len(plain[0].tokens) % (k + 1) != 1
    for r in got:
        assert r.stats.acceptance == 1.0 and r.stats.tokens_per_step <= k + 1
        assert r.stats.target_steps == -(-(len(r.tokens) - 1) // (k + 1))
        # tokens per step count what the row kept (and the stop id that ended it), not the run
        # past a stop: every step but the last gives k + 1
        produced = round(r.stats.tokens_per_step * r.stats.target_steps)
        assert produced in (len(r.tokens) - 1, len(r.tokens))


def _bigram(scripted_model, shift: int) -> Model:
    """A model whose greedy next token is (7 * current + shift) mod V, for every token."""
    V = 512
    return scripted_model({c: (7 * c + shift) % V for c in range(V)})


def test_always_wrong_draft_gives_exact_output_one_token_per_step(scripted_model):
    target, wrong = _bigram(scripted_model, 3), _bigram(scripted_model, 4)
    prompts = [[5, 9, 1], [77]]
    ref = jllm.generate(target, prompts, max_new_tokens=12, stop_token_ids=[])
    assert ref[1].tokens[:2] == [(7 * 77 + 3) % 512, (7 * ((7 * 77 + 3) % 512) + 3) % 512]
    for k in (1, 4):
        got = jllm.generate(target, prompts, max_new_tokens=12, stop_token_ids=[],
                            speculative=sp.Speculative(sp.DraftModel(wrong), k))
        assert [r.tokens for r in got] == [r.tokens for r in ref]
        for r in got:
            assert (r.stats.acceptance, r.stats.tokens_per_step, r.stats.target_steps) == (0.0, 1.0, 11)
            assert r.stats.draft_tokens_per_step == k


def test_prompt_lookup_accepts_a_repeated_path(scripted_model):
    """The prompt walks the target's own greedy path and returns to its start, so the drafts that
    prompt lookup copies from the prompt are all right."""
    target = _bigram(scripted_model, 3)
    path = [11]
    for _ in range(12):
        path.append((7 * path[-1] + 3) % 512)
    ref = jllm.generate(target, [path + [11]], max_new_tokens=10, stop_token_ids=[])
    [got] = jllm.generate(target, [path + [11]], max_new_tokens=10, stop_token_ids=[],
                          speculative=sp.Speculative(sp.PromptLookup(2), 4))
    assert got.tokens == ref[0].tokens == path[1:11]
    assert got.stats.acceptance == 1.0 and got.stats.target_steps == 2


@pytest.mark.parametrize("name", ["self_int8", "prompt_lookup"])
def test_a_prompt_that_fills_the_context(tiny_model, proposers, name):
    """Prompt plus output take all max_seq_len positions: the cache has 2 (k + 1) slots more than
    the context, so the last round's drafts, and a draft model's extra round, still fit."""
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, 512, tiny_model.cfg.max_seq_len - 12).tolist()
    ref = jllm.generate(tiny_model, [prompt], max_new_tokens=12, stop_token_ids=[])
    got = jllm.generate(tiny_model, [prompt], max_new_tokens=12, stop_token_ids=[],
                        speculative=sp.Speculative(proposers[name], 2))
    assert got[0].tokens == ref[0].tokens and len(got[0].tokens) == 12


@pytest.mark.parametrize("name", ["self_int8", "prompt_lookup"])
def test_device_drafts_dispatch_the_next_round_before_reading_the_last(tiny_model, proposers, name,
                                                                       monkeypatch):
    """A draft model's rounds go out one ahead of the host (one extra round, dropped, at the end);
    prompt lookup drafts from the host's tokens, so each round waits for the last. Same tokens."""
    events = []
    real_launch = sp.launch

    def spy(*args, **kw):
        events.append("launch")
        return real_launch(*args, **kw)

    monkeypatch.setattr(sp, "launch", spy)
    prompt = _prompts(tiny_model)[2]
    [r] = jllm.generate(tiny_model, [prompt], max_new_tokens=N, stop_token_ids=[],
                        speculative=sp.Speculative(proposers[name], 3))
    [want] = jllm.generate(tiny_model, [prompt], max_new_tokens=N, stop_token_ids=[])
    assert r.tokens == want.tokens
    extra = 0 if name == "prompt_lookup" else 1
    assert len(events) == r.stats.target_steps + extra


def test_no_recompiles_across_rounds_and_calls(tiny_model, proposers):
    """Greedy, sampled and sampled-with-cuts calls are one program each (Sampling.greedy and
    .filtered are static); new prompts of the same bucket, other sampling values and seeds compile
    nothing more."""
    spec = sp.Speculative(proposers["self_int8"], 3)
    jllm.generate(tiny_model, _prompts(tiny_model), max_new_tokens=N, stop_token_ids=[], speculative=spec)
    jllm.generate(tiny_model, _prompts(tiny_model), max_new_tokens=N, stop_token_ids=[], speculative=spec,
                  temperature=1.0, seed=1, top_p=0.95)
    compiled = sp.verify._cache_size(), sp.draft_tokens._cache_size()
    rng = np.random.default_rng(5)
    other = [rng.integers(3, 512, n).tolist() for n in (2, 16, 7)]
    jllm.generate(tiny_model, other, max_new_tokens=N, stop_token_ids=[], speculative=spec,
                  temperature=0.7, top_k=40, top_p=0.9, seed=3)
    jllm.generate(tiny_model, other[::-1], max_new_tokens=N, stop_token_ids=[], speculative=spec)
    assert (sp.verify._cache_size(), sp.draft_tokens._cache_size()) == compiled


def test_streaming_matches_the_completions(tiny_model, proposers, stops, plain):
    deltas = []
    got = jllm.generate(tiny_model, _prompts(tiny_model), max_new_tokens=N, **stops, stream=deltas.append,
                        speculative=sp.Speculative(proposers["self_int8"], 4))
    for r in got:
        i = got.index(r)
        assert [t for d in deltas if d.index == i for t in d.token_ids] == r.tokens
        assert "".join(d.text for d in deltas if d.index == i) == r.text


# --- the caches after rejections -----------------------------------------------------------------

def _plain_cache(model: Model, prompt: list[int], tokens: list[int], S: int):
    """The cache of a plain run of one row: the prompt prefilled, then `tokens` fed one at a time."""
    cfg = model.cfg
    cache = init_cache(cfg, 1, S, model.cache_dtype)
    T = bucket(len(prompt))
    padded = np.zeros((1, T), np.int32)
    padded[0, :len(prompt)] = prompt
    greedy = Sampling.make(1)
    _, cache, key = prefill(model.params, jnp.asarray(padded), jnp.asarray([len(prompt)]), cache, greedy,
                            jax.random.key(0), cfg=cfg, plan=model.plan)
    for t in tokens:
        _, cache, key = decode(model.params, jnp.asarray([t], jnp.int32), cache, greedy, key, cfg=cfg, plan=model.plan)
    return cache


def _assert_cache_rows_equal(cache, plain, row: int) -> None:
    n = int(cache.lengths[row])
    assert n == int(plain.lengths[0])
    for got, want in zip(cache.k + cache.v, plain.k + plain.v):
        np.testing.assert_allclose(np.asarray(got[row, :n]), np.asarray(want[0, :n]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["draft", "self_int8"])
def test_caches_after_rejections_equal_a_plain_run(tiny_model, proposers, name):
    """After every round (partial, full and no acceptance) the target cache and the draft cache hold,
    up to their lengths, what plain decoding of the same tokens writes."""
    model, proposer, k = tiny_model, proposers[name], 3
    spec = sp.Speculative(proposer, k)
    prompts = _prompts(model)[:2]
    B, T, S = 2, 16, 64
    tokens = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    sampling = Sampling.make(B)
    first, dec = sp.start(model, spec, tokens, np.array([len(p) for p in prompts], np.int32), S, sampling)
    seqs = [[int(first[i])] for i in range(B)]
    seen = set()
    for _ in range(4):
        active = np.ones(B, bool)
        out, n, m, dec = sp.step(model, spec, dec, [p + s for p, s in zip(prompts, seqs)], active, sampling)
        seen.update(int(x) for x in n)
        for i in range(B):
            seqs[i] += out[i, :n[i] + 1].tolist()
            # The target cache holds everything but the newest token.
            _assert_cache_rows_equal(dec.cache, _plain_cache(model, prompts[i], seqs[i][:-1], S), i)
            # The draft cache holds everything but its head (one token, or two after a full acceptance).
            d = proposer.model
            n_head = int(dec.proposal.n_head[i])
            assert n_head == (2 if n[i] == k else 1)
            assert np.asarray(dec.proposal.head[i, :n_head]).tolist() == seqs[i][len(seqs[i]) - n_head:]
            _assert_cache_rows_equal(dec.proposal.cache, _plain_cache(d, prompts[i], seqs[i][:-n_head], S), i)
    assert k in seen and (name == "self_int8" or any(0 < x < k for x in seen)), seen


# --- sampling: exactly the target's distribution -------------------------------------------------

V16 = 16
ROWS = 4096
TEMPERATURE, TOP_K = 0.9, 12
ALPHA = 1e-3


@pytest.fixture(scope="module")
def small_vocab():
    """A 16-token target and a deliberately different draft (other random weights), no tokenizer."""
    cfg = LlamaConfig.from_name("tiny", vocab_size=V16)
    target = Model(params=random_params(cfg, seed=0), cfg=cfg)
    draft = Model(params=random_params(cfg, seed=7), cfg=cfg)
    return target, draft


PROMPT = [3, 14, 1, 7]


def _exact_joint(model: Model) -> np.ndarray:
    """P(t1, t2, t3) [V, V, V] of the first three tokens after PROMPT, from the target's logits:
    softmax(logits / TEMPERATURE) over the TOP_K largest, in float64."""
    grid = np.stack(np.meshgrid(np.arange(V16), np.arange(V16), indexing="ij"), -1).reshape(-1, 2)
    seqs = np.concatenate([np.tile(PROMPT, (len(grid), 1)), grid], axis=1)             # [256, 6]
    cache = init_cache(model.cfg, len(seqs), 8, jnp.float32)
    lg, _ = forward(model.params, jnp.asarray(seqs, jnp.int32), cache, model.cfg)
    lg = np.asarray(lg, np.float64)[:, len(PROMPT) - 1:] / TEMPERATURE                # [256, 3, V]
    kth = np.sort(lg, axis=-1)[..., -TOP_K][..., None]
    p = np.where(lg >= kth, np.exp(lg - lg.max(-1, keepdims=True)), 0.0)
    p /= p.sum(-1, keepdims=True)
    p1 = p[0, 0]                                                                      # [V]
    p2 = p[::V16, 1]                                                                  # [V(t1), V]
    p3 = p[:, 2].reshape(V16, V16, V16)                                               # [t1, t2, V]
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square test of counts against probs; cells expected under 5 are pooled."""
    counts, probs = counts.ravel().astype(np.float64), probs.ravel()
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    dof = int(keep.sum()) - 1
    return float(jax.scipy.special.gammaincc(dof / 2, stat / 2))


def _sample_tokens(target: Model, draft: Model, rule, k: int = 2) -> np.ndarray:
    """The first three generated tokens of ROWS rows of PROMPT [ROWS, 3]: t1 from the prefill, t2
    and t3 from the first rounds of speculation."""
    spec = sp.Speculative(sp.DraftModel(draft), k)
    out = sp.generate(target, [PROMPT] * ROWS, spec, max_new_tokens=3, temperature=TEMPERATURE,
                      top_k=TOP_K, stop_token_ids=[], seed=1, rule=rule)
    return np.array([r.tokens for r in out])


def _pvalues(samples: np.ndarray, joint: np.ndarray) -> tuple[float, float]:
    """p-values of the joint of (t1, t2) and of (t2, t3)."""
    c12 = np.zeros((V16, V16))
    c23 = np.zeros((V16, V16))
    np.add.at(c12, (samples[:, 0], samples[:, 1]), 1)
    np.add.at(c23, (samples[:, 1], samples[:, 2]), 1)
    return _chi2_pvalue(c12, joint.sum(2)), _chi2_pvalue(c23, joint.sum(0))


def _accept_always(p, q, drafts, m, key):
    """Broken: every draft is kept, then the token after them from p."""
    B = drafts.shape[0]
    n = m
    return n, jax.random.categorical(key, jnp.log(p[jnp.arange(B), n]), axis=-1).astype(jnp.int32)


def _resample_from_p(p, q, drafts, m, key):
    """Broken: the acceptance test is right, but a rejected draft is replaced by a draw from p
    instead of the normalised max(0, p - q)."""
    B, k = drafts.shape
    k_accept, k_token = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    ok = (jax.random.uniform(k_accept, (B, k)) * q_d < p_d) & (jnp.arange(k) < m[:, None])
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = p[jnp.arange(B), n]
    return n, jax.random.categorical(k_token, jnp.log(p_n), axis=-1).astype(jnp.int32)


@pytest.fixture(scope="module")
def joint(small_vocab):
    return _exact_joint(small_vocab[0])


def test_sampled_tokens_follow_the_target_distribution(small_vocab, joint):
    target, draft = small_vocab
    samples = _sample_tokens(target, draft, sp.rejection)
    p12, p23 = _pvalues(samples, joint)
    assert p12 > ALPHA and p23 > ALPHA, (p12, p23)


@pytest.mark.parametrize("rule", [_accept_always, _resample_from_p], ids=["accept_always", "resample_from_p"])
def test_a_broken_rejection_rule_fails_the_same_test(small_vocab, joint, rule):
    target, draft = small_vocab
    samples = _sample_tokens(target, draft, rule)
    p12, p23 = _pvalues(samples, joint)
    assert min(p12, p23) < ALPHA, (p12, p23)


# --- proposer pieces, the CLI helpers, errors ------------------------------------------------------

@pytest.mark.parametrize("seq, n, k, want", [
    ([1, 2, 3, 9, 1, 2], 3, 3, [3, 9, 1]),          # "1 2" recurs: what followed it
    ([5, 1, 2, 7, 1, 2, 8, 2], 3, 4, [8, 2]),        # only the unigram "2" recurs; the latest match wins
    ([4, 4, 4], 2, 5, [4]),                          # the continuation stops at the sequence's end
    ([1, 2, 3], 3, 2, []),                           # nothing recurs
    ([7], 3, 2, []),
], ids=["bigram", "latest_unigram", "overlap", "none", "one_token"])
def test_lookup_proposes_what_followed_the_longest_recurring_ngram(seq, n, k, want):
    assert sp.lookup(seq, n, k) == want


def test_lookup_prefers_the_longer_ngram():
    # "3" recurs latest at index 5 (followed by 6), but "2 3" recurs at index 1 (followed by 4).
    assert sp.lookup([1, 2, 3, 4, 0, 3, 6, 2, 3], 2, 1) == [4]
    assert sp.lookup([1, 2, 3, 4, 0, 3, 6, 2, 3], 1, 1) == [6]


def test_draft_model_check_refuses_another_vocabulary(tiny_model, tiny_model_no_tokenizer, tokenizer_path, tmp_path):
    cfg = LlamaConfig.from_name("tiny", vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size=256"):
        sp.DraftModel(Model(params=random_params(cfg), cfg=cfg)).check(tiny_model)
    with pytest.raises(ValueError, match="only one of the draft and the target has a tokenizer"):
        sp.DraftModel(tiny_model_no_tokenizer).check(tiny_model)
    import sentencepiece as spm

    from convert.tiny import local_corpus
    from jllm.tokenizer import SentencePieceTokenizer as Tokenizer
    # The same corpus and size, another algorithm: 512 pieces, not the same ones.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(local_corpus()), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=512, model_type="unigram", byte_fallback=True, minloglevel=2,
                                   num_threads=1)
    with pytest.raises(ValueError, match="tokenizer differs from the target's: piece"):
        sp.DraftModel(dataclasses.replace(tiny_model, tokenizer=Tokenizer(tmp_path / "uni.model"))).check(tiny_model)
    # The same pieces loaded twice are fine.
    sp.DraftModel(dataclasses.replace(tiny_model, tokenizer=Tokenizer(tokenizer_path))).check(tiny_model)


def test_bad_speculation_arguments_are_refused(tiny_model):
    with pytest.raises(ValueError, match="k=0 must be an int >= 1"):
        sp.Speculative(sp.PromptLookup(2), 0)
    with pytest.raises(TypeError, match="proposer must be"):
        sp.Speculative("ngram", 2)
    with pytest.raises(ValueError, match="max_ngram=0"):
        sp.PromptLookup(0)
    with pytest.raises(TypeError, match="speculative must be"):
        jllm.generate(tiny_model, "Hi", max_new_tokens=2, speculative=4)
    with pytest.raises(ValueError, match="already quantized"):
        sp.self_draft(dataclasses.replace(tiny_model, quant="int8"), "int8")
    with pytest.raises(ValueError, match="quantize='int3'"):
        sp.self_draft(tiny_model, "int3")
    with pytest.raises(ValueError, match="max_new_tokens=0"):  # the usual argument checks still apply
        jllm.generate(tiny_model, "Hi", max_new_tokens=0, speculative=sp.Speculative(sp.PromptLookup(2), 2))


def test_from_args_builds_each_proposer_and_refuses_bad_combinations(tiny_model, tiny_checkpoint):
    assert sp.from_args(tiny_model, None) is None
    s = sp.from_args(tiny_model, 3, prompt_lookup=2)
    assert s.k == 3 and s.proposer == sp.PromptLookup(2)
    s = sp.from_args(tiny_model, 2, draft_quantize="int8")
    assert s.proposer.model.quant == "int8" and s.proposer.model.params.layers[0].wq.bits == 8
    s = sp.from_args(tiny_model, 2, draft=tiny_checkpoint)
    assert s.proposer.model.cfg == tiny_model.cfg
    np.testing.assert_array_equal(np.asarray(s.proposer.model.params.norm), np.asarray(tiny_model.params.norm))
    with pytest.raises(ValueError, match="draft_quantize given without speculate"):
        sp.from_args(tiny_model, None, draft_quantize="int8")
    with pytest.raises(ValueError, match="exactly one of draft, draft_quantize, prompt_lookup"):
        sp.from_args(tiny_model, 2, draft_quantize="int8", prompt_lookup=3)
    with pytest.raises(ValueError, match="exactly one"):
        sp.from_args(tiny_model, 2)
    with pytest.raises(ValueError, match="speculate=-1"):
        sp.from_args(tiny_model, -1, prompt_lookup=3)
    with pytest.raises(ValueError, match="draft_quantize='int2'"):
        sp.from_args(tiny_model, 2, draft_quantize="int2")


def test_format_stats_weights_rows_by_their_steps():
    from jllm.generate import Stats
    a = Stats(4, 9, 0.1, 10.0, 0.0, draft_tokens_per_step=4.0, acceptance=0.5, tokens_per_step=3.0, target_steps=2)
    b = Stats(4, 9, 0.1, 10.0, 0.0, draft_tokens_per_step=4.0, acceptance=1.0, tokens_per_step=5.0, target_steps=6)
    # drafted 8 + 24 = 32, accepted 4 + 24 = 28; produced 6 + 30 = 36 over 8 steps.
    assert sp.format_stats([a, b]) == "acceptance 87.5%, 4.50 tokens/step, 4.0 drafted/step"
    assert sp.format_stats(a) == "acceptance 50.0%, 3.00 tokens/step, 4.0 drafted/step"
    assert sp.format_stats(Stats(4, 9, 0.1, 10.0, 0.0)) == ""


# --- the benchmark, on CPU ---------------------------------------------------------------------------

def test_benchmark_measures_self_drafts_and_the_cost_model(tmp_path):
    from scripts.gpu import speculative_bench as sb
    cfg = LlamaConfig.from_name("tiny", ffn_dim=192)  # int4 groups of 32 divide every input dim
    model = Model(params=random_params(cfg), cfg=cfg)
    drafts = {"int4": sp.self_draft(model, "int4", group_size=32).model}
    r = sb.measure(model, drafts, ks=(2,), prompt_len=6, new_tokens=8, repeats=1, step_repeats=2)
    [run] = r["runs"]
    assert run["same_tokens"] and 0 <= run["acceptance"] <= 1 and run["tok_s"] > 0
    assert run["speedup"] == pytest.approx(run["tok_s"] / r["plain_tok_s"])
    a, k = 0.7, 2
    assert r["t_plain_ms"] == pytest.approx(1e3 / r["plain_tok_s"])  # the speed-up's own baseline
    want = (1 + a + a * a) * r["t_plain_ms"] / (r["t_draft_ms"]["int4"][2] + r["t_verify_ms"][2])
    assert run["curve"][sb.ACCEPTANCE_GRID.index(a)] == pytest.approx(want)
    assert sb.expected_tokens(1.0, k) == 3 and sb.expected_tokens(0.0, k) == 1
    assert run["predicted_at_tokens"] == pytest.approx(
        run["tokens_per_step"] * r["t_plain_ms"] / (r["t_draft_ms"]["int4"][2] + r["t_verify_ms"][2]))
    table = sb.format_table(r)
    assert "verify k+1 vs 1-token step: k=2" in table and "int4" in table.splitlines()[-1]
    path = str(tmp_path / "spec.png")
    sb.plot(r, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tokens_per_step_count_only_what_max_new_tokens_keeps(tiny_model):
    """An identical draft accepts all 4 drafts, but max_new_tokens=3 keeps 2 tokens after the
    prefill's: the one target step produced 2, not 5."""
    [r] = jllm.generate(tiny_model, [[1, 5, 9]], max_new_tokens=3, stop_token_ids=[],
                        speculative=sp.Speculative(sp.DraftModel(tiny_model), 4))
    assert len(r.tokens) == 3 and r.stats.target_steps == 1
    assert r.stats.tokens_per_step == 2 and r.stats.acceptance == 1.0
