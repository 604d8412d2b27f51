"""The speculative loop is lossless: greedy output = the target's greedy output, sampled output ~ the target's own
sampling distribution (and the test would catch a wrong acceptance rule); the draft's context cache is exact."""

import copy

import pytest
import torch
from _helpers.inference_models import oracle_draft, random_draft, tiny_target

from nemo_automodel_dspark.inference import speculative
from nemo_automodel_dspark.inference.speculative import (
    SpeculativeDecoder,
    greedy_verify,
    pick,
    probabilities,
    sample,
    target_decode,
    verify_block,
)
from nemo_automodel_dspark.target.capture import capture_target_features

PROMPTS = [[5, 9, 2, 33, 7], [1, 2, 3], [40, 41, 12, 12, 60, 3, 8, 19, 22]]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hf_greedy(target, prompt, max_new_tokens):
    out = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expecting < 5 samples are pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(float(obs.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))  # survival function of chi2(dof)


# ---------------------------------------------------------------------------------------------- the acceptance rule
def test_equal_distributions_accept_every_draft_token():
    p = torch.softmax(torch.randn(4, 10, generator=gen(1)), -1)
    for seed in range(20):
        tokens = sample(p[:3], gen(seed))
        n, _ = verify_block(p, p[:3], tokens, gen(seed))
        assert n == 3


def test_rejected_token_is_resampled_from_the_residual():
    p_draft = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # the draft always proposes token 0 ...
    p_target = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25] * 4])  # ... which the target never produces
    for seed in range(20):
        n, nxt = verify_block(p_target, p_draft, torch.tensor([0]), gen(seed))
        assert n == 0 and int(nxt) in (1, 2)


def test_greedy_rule_accepts_exactly_the_target_argmax():
    logits_t = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    p_t = probabilities(logits_t, 0.0)
    tokens = torch.tensor([1, 2])  # first matches the target argmax (1), second does not (argmax 0)
    n, nxt = verify_block(p_t, probabilities(torch.eye(3)[tokens] * 9, 0.0), tokens, gen())
    assert (n, int(nxt)) == (1, 0)


def test_greedy_fast_path_is_the_one_hot_limit_of_the_rule():
    """`greedy_verify` / `pick` at T = 0 decide exactly what `verify_block` / `sample` decide on one-hot inputs."""
    g = gen(5)
    accepted = set()
    for _ in range(200):
        logits = torch.randn(5, 6, generator=g)
        tokens = logits[:4].argmax(-1)
        wrong = torch.rand(4, generator=g) < 0.3  # corrupt some slots so every accepted length occurs
        tokens = torch.where(wrong, (tokens + 1) % 6, tokens)
        n, nxt = greedy_verify(logits, tokens)
        p_draft = torch.nn.functional.one_hot(tokens, 6).float()
        assert (n, int(nxt)) == tuple(map(int, verify_block(probabilities(logits, 0.0), p_draft, tokens, g)))
        token, probs = pick(logits, 0.0, g)
        assert probs is None and torch.equal(token, sample(probabilities(logits, 0.0), g))
        accepted.add(n)
    assert accepted == {0, 1, 2, 3, 4}


def test_first_output_token_follows_the_target_exactly():
    """Monte Carlo over the rule alone: output token 0 ~ p_t,0 whatever p_d is."""
    p_t = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25] * 4])
    p_d = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g, counts = gen(3), torch.zeros(4)
    for _ in range(4000):
        y = sample(p_d, g)
        n, nxt = verify_block(p_t, p_d, y, g)
        counts[int(y[0]) if n else int(nxt)] += 1
    assert chi_square_p_value(counts, p_t[0]) > 1e-3


# ---------------------------------------------------------------------------------------------- greedy = target greedy
@pytest.fixture(scope="module")
def target():
    return tiny_target(64)


@pytest.fixture(scope="module")
def weak_context_target():
    """Still context dependent, but mostly predicted by the last token: the oracle draft is often right."""
    return tiny_target(64, context=0.05)


@pytest.mark.parametrize(
    "head, block, verify",
    [("vanilla", 4, None), ("rnn", 4, None), ("gated", 5, 2), ("none", 3, None), ("oracle", 4, None), ("oracle", 6, 3)],
)
def test_greedy_output_equals_target_generate(target, weak_context_target, head, block, verify):
    if head == "oracle":
        target = weak_context_target
        draft = oracle_draft(target, block_size=block)
    elif head == "none":
        draft = random_draft(target, rank=0, block_size=block)
    else:
        draft = random_draft(target, head_type=head, block_size=block)
    decoder = SpeculativeDecoder(target, draft, temperature=0.0, verify_len=verify)
    lengths = []
    for prompt in PROMPTS:
        state = decoder.generate(prompt, 20, gen())
        assert state.generated == hf_greedy(target, prompt, 20)
        lengths += [r.accept_length for r in state.rounds]
        assert all(len(r.acceptance) == min(r.accept_length, r.verify_len) for r in state.rounds)
        assert all(len(r.confidence_logits or []) in (0, r.verify_len) for r in state.rounds)
        assert all(r.verify_len == (verify or block) for r in state.rounds)
    assert max(lengths) <= (verify or block) + 1
    if head == "oracle":  # the acceptance path must be exercised, not only rejections
        assert max(lengths) >= 3


def test_greedy_on_a_sliding_window_target():
    """Gemma4 caches of sliding layers are cropped after each rejection; prompts run past the window of 4."""
    from nemo_automodel_dspark.target.tiny import tiny_target

    target = tiny_target(
        "gemma4_causal",
        num_hidden_layers=2,
        sliding_window=4,
        final_logit_softcapping=0.5,
        max_position_embeddings=128,
        attention_k_eq_v=True,
    )
    draft = random_draft(target, block_size=3, layer_ids=(0,))
    for prompt in PROMPTS:
        state = SpeculativeDecoder(target, draft).generate(prompt, 12, gen())
        assert state.generated == hf_greedy(target, prompt, 12)


def test_stops_at_eos_like_generate():
    target = tiny_target(64)
    eos = hf_greedy(target, PROMPTS[0], 12)[6]  # a token the greedy output produces
    target = tiny_target(64, eos=eos)
    state = SpeculativeDecoder(target, oracle_draft(target)).generate(PROMPTS[0], 40, gen())
    assert state.generated == hf_greedy(target, PROMPTS[0], 40)
    assert state.generated[-1] == eos and state.generated.count(eos) == 1


def test_exactly_max_new_tokens_when_rounds_overshoot():
    target = tiny_target(32, context=0.0)
    decoder = SpeculativeDecoder(target, oracle_draft(target, block_size=4))
    for n in (1, 2, 7, 11):
        assert decoder.generate(PROMPTS[1], n, gen()).generated == hf_greedy(target, PROMPTS[1], n)


def test_target_only_decoding_equals_generate(target):
    for prompt in PROMPTS:
        assert target_decode(target, prompt, max_new_tokens=15, temperature=0.0, generator=gen()) == hf_greedy(
            target, prompt, 15
        )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_perfect_draft_accepts_every_token(temperature):
    """On a bigram target the oracle draft has p_d = p_t: every round accepts all K drafts plus the bonus."""
    target = tiny_target(32, context=0.0)
    state = SpeculativeDecoder(target, oracle_draft(target, block_size=4), temperature=temperature).generate(
        [5, 9, 2, 13, 7], 31, gen()
    )
    assert [r.accept_length for r in state.rounds] == [5] * 6


# ---------------------------------------------------------------------------------------------- caches
def test_cached_context_equals_recomputation(target):
    """After several rounds, the appended draft K/V equals projecting the whole committed prefix from scratch."""
    draft = random_draft(target, head_type="rnn")
    decoder = SpeculativeDecoder(target, oracle_draft(target), temperature=1.0)
    decoder.draft = draft  # random draft: plenty of rejections, so the crops are exercised
    state = decoder.prefill(PROMPTS[2], gen())
    for _ in range(6):
        decoder.step(state, gen())
    committed = torch.tensor([state.tokens[:-1]])
    assert state.target_cache.get_seq_length() == committed.shape[1]
    features = capture_target_features(target, committed, None, draft.dspark.target_layer_ids).features
    with torch.no_grad():
        fresh = draft.context_kv(features, torch.arange(committed.shape[1]).unsqueeze(0))
    for (k, v), (k0, v0) in zip(state.draft_kv, fresh, strict=True):
        torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- sampling is lossless
def _first_two_tokens(decoder, state, samples: int, seed: int) -> torch.Tensor:
    """Counts [V*V] of the next two tokens after `state`, each sample from a fresh copy of the caches."""
    vocab = decoder.target.config.vocab_size
    g, counts = gen(seed), torch.zeros(vocab * vocab)
    for _ in range(samples):
        s = copy.deepcopy(state)
        new = decoder.step(s, g)
        if len(new) < 2:
            new = new + decoder.step(s, g)
        counts[new[0] * vocab + new[1]] += 1
    return counts


def _exact_first_two(target, tokens: list[int]) -> torch.Tensor:
    """p(a, b | tokens) = p_t(a | tokens) · p_t(b | tokens, a), flattened [V*V]."""
    vocab = target.config.vocab_size
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([tokens])).logits[0, -1].double(), -1)
        batch = torch.tensor([tokens + [a] for a in range(vocab)])
        second = torch.softmax(target(batch).logits[:, -1].double(), -1)
    return (first[:, None] * second).flatten()


def test_sampling_matches_the_target_distribution(monkeypatch):
    target = tiny_target(16)
    decoder = SpeculativeDecoder(target, random_draft(target, block_size=3, rank=4), temperature=1.0)
    state = decoder.prefill([3, 1, 4, 1, 5], gen(7))
    exact = _exact_first_two(target, state.tokens)
    counts = _first_two_tokens(decoder, state, 1500, seed=11)
    assert chi_square_p_value(counts, exact) > 1e-3

    def accept_everything(p_target, p_draft, tokens, generator):  # a wrong rule: the output follows the draft
        return tokens.numel(), sample(p_target[tokens.numel()], generator)

    monkeypatch.setattr(speculative, "verify_block", accept_everything)
    broken = _first_two_tokens(decoder, state, 1500, seed=11)
    assert chi_square_p_value(broken, exact) < 1e-6
