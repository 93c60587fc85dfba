"""The decision rule and its keyed randomness, on hand-made distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expansion.engine.sampling import (
    inverse_cdf,
    keyed_uniforms,
    mixed_policy_decisions,
    next_token_distributions,
    proposer_guess,
    sequence_key,
    verifier_guess,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def dist(logits: list[list[float]], **kwargs: float) -> object:
    settings = {"temperature": 1.0, "top_k": 20, "top_p": 1.0} | kwargs
    return next_token_distributions(torch.tensor(logits, dtype=torch.float64), **settings)


def logits_for(probs: list[float]) -> list[float]:
    return [math.log(p) if p > 0 else -1e9 for p in probs]


# --- keyed randomness -------------------------------------------------------------------------


def test_uniforms_depend_only_on_their_key_position_and_draw():
    alone = keyed_uniforms(7, np.array([42]), np.array([[5, 6]]), 3)  # (1, 2, 3)
    batched = keyed_uniforms(7, np.array([1, 42]), np.array([[0, 1], [5, 6]]), 3)
    assert np.array_equal(alone[0], batched[1])
    shifted = keyed_uniforms(7, np.array([42]), np.array([[6]]), 3)
    assert np.array_equal(alone[0, 1], shifted[0, 0])


def test_uniforms_change_with_every_coordinate():
    base = keyed_uniforms(1, np.array([10]), np.array([[3]]), 2)[0, 0]
    assert base[0] != base[1]
    assert keyed_uniforms(2, np.array([10]), np.array([[3]]), 2)[0, 0, 0] != base[0]
    assert keyed_uniforms(1, np.array([11]), np.array([[3]]), 2)[0, 0, 0] != base[0]
    assert keyed_uniforms(1, np.array([10]), np.array([[4]]), 2)[0, 0, 0] != base[0]


def test_uniforms_look_uniform():
    u = keyed_uniforms(0, np.arange(200), np.tile(np.arange(50), (200, 1)), 4).ravel()
    assert u.min() >= 0.0 and u.max() < 1.0
    counts, _ = np.histogram(u, bins=20, range=(0.0, 1.0))
    expected = u.size / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60, chi2  # 19 degrees of freedom; p < 1e-6 beyond 60
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02


def test_sequence_key_is_stable_and_distinct():
    assert sequence_key("aime-1985-1", 0) == sequence_key("aime-1985-1", 0)
    keys = {sequence_key(f"p{i}", s) for i in range(50) for s in range(32)}
    assert len(keys) == 50 * 32
    assert all(0 <= k < 2**63 for k in keys)


# --- distributions ----------------------------------------------------------------------------


def test_top_k_is_sorted_renormalised_and_ties_go_to_the_lower_id():
    d = dist([[1.0, 3.0, 3.0, 0.0, 2.0]], top_k=3)
    assert d.token_ids.tolist() == [[1, 2, 4]]
    e = np.exp([3.0, 3.0, 2.0])
    assert np.allclose(d.probs.numpy()[0], e / e.sum())
    full = np.exp([1.0, 3.0, 3.0, 0.0, 2.0])
    assert np.allclose(d.full_logprobs.exp().numpy()[0], np.exp([3.0, 3.0, 2.0]) / full.sum())


def test_temperature_applies_before_top_k_and_to_full_logprobs():
    d = dist([[0.0, 1.0, 2.0]], temperature=0.5, top_k=2)
    e = np.exp([4.0, 2.0])
    assert np.allclose(d.probs.numpy()[0], e / e.sum())
    assert np.isclose(float(d.log_normalizer[0]), np.log(np.exp([0.0, 2.0, 4.0]).sum()))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    d = dist([logits_for([0.5, 0.3, 0.15, 0.05])], top_p=0.75)
    assert np.allclose(d.probs.numpy()[0], [0.625, 0.375, 0.0, 0.0])
    always_one = dist([logits_for([0.9, 0.1])], top_p=0.1)
    assert np.allclose(always_one.probs.numpy()[0], [1.0, 0.0])


def test_forbidden_tokens_vanish_and_non_finite_rows_are_flagged():
    d = next_token_distributions(
        torch.tensor([[5.0, 1.0, 0.0], [0.0, float("nan"), 0.0], [0.0, float("inf"), 0.0]]),
        temperature=1.0,
        top_k=3,
        top_p=1.0,
        forbidden_token_ids=torch.tensor([0]),
    )
    assert d.token_ids[0, :2].tolist() == [1, 2] and float(d.probs[0, 2]) == 0.0
    assert d.finite.tolist() == [True, False, False]


def test_inverse_cdf_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 0.49, 0.5, 0.79, 0.8, 0.999999]], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [[0, 0, 1, 1, 2, 2]]


# --- the rule ---------------------------------------------------------------------------------


def decide(prop: list[float], ver: list[float], u: list[float], tau: float, **kw: object):
    return mixed_policy_decisions(
        dist([logits_for(prop)]),
        dist([logits_for(ver)]),
        torch.tensor([u], dtype=torch.float64),
        tau=tau,
        **kw,
    )


def test_first_acceptable_candidate_wins():
    # Proposer candidates by u: 0.1 -> token 0, 0.6 -> token 1, 0.95 -> token 2.
    prop = [0.5, 0.4, 0.1]
    ver = [0.05, 0.9, 0.05]
    d = decide(prop, ver, [0.1, 0.6, 0.95, 0.5], tau=0.5)
    assert (int(d.token_ids[0]), bool(d.accepted[0]), int(d.draws[0])) == (1, True, 2)


def test_fallback_after_r_rejections_samples_the_verifier():
    # Verifier sorted: token 2 (0.6), 0 (0.2), 1 (0.2); u = 0.5 -> 2, u = 0.99 -> 1.
    d = decide([0.9, 0.1, 0.0], [0.2, 0.2, 0.6], [0.1, 0.2, 0.3, 0.5], tau=0.5)
    assert (int(d.token_ids[0]), bool(d.accepted[0]), int(d.draws[0])) == (2, False, 3)
    d = decide([0.9, 0.1, 0.0], [0.2, 0.2, 0.6], [0.1, 0.2, 0.3, 0.99], tau=0.5)
    assert (int(d.token_ids[0]), bool(d.accepted[0]), int(d.draws[0])) == (1, False, 3)


def test_tau_zero_is_pure_proposer_sampling_and_tau_one_pure_verifier_sampling():
    # Token 2 is outside the verifier's top-2: still accepted at tau = 0.
    prop, ver = [0.1, 0.1, 0.8], [0.5, 0.5, 0.0]
    zero = decide(prop, ver, [0.5, 0.5, 0.1], tau=0.0)
    assert (int(zero.token_ids[0]), bool(zero.accepted[0])) == (2, True)
    one = decide([0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], tau=1.0)
    assert (int(one.token_ids[0]), bool(one.accepted[0])) == (1, False)


def test_candidate_outside_verifier_top_k_is_rejected():
    prop = [0.0, 0.0, 1.0]
    logits_v = [logits_for([0.6, 0.35, 0.05])]
    ver = dist(logits_v, top_k=2)
    d = mixed_policy_decisions(
        dist([logits_for(prop)], top_k=2),
        ver,
        torch.tensor([[0.3, 0.3, 0.7]], dtype=torch.float64),
        tau=0.01,
    )
    assert (int(d.token_ids[0]), bool(d.accepted[0])) == (1, False)


def test_full_and_top_k_acceptance_differ_as_documented():
    # Verifier: token 0 has full probability 0.45 but 0.9 of its top-2 (tokens 0 and 1).
    ver = [0.45] + [0.05] * 11
    prop = [1.0] + [0.0] * 11
    u = [0.5, 0.5, 0.5]
    full = mixed_policy_decisions(
        dist([logits_for(prop)], top_k=2),
        dist([logits_for(ver)], top_k=2),
        torch.tensor([u], dtype=torch.float64),
        tau=0.8,
        acceptance="full",
    )
    renormalised = mixed_policy_decisions(
        dist([logits_for(prop)], top_k=2),
        dist([logits_for(ver)], top_k=2),
        torch.tensor([u], dtype=torch.float64),
        tau=0.8,
        acceptance="top_k",
    )
    assert not bool(full.accepted[0]) and bool(renormalised.accepted[0])


def test_rule_matches_its_analytic_distribution():
    """P(t) = q_L(t) [t in A] (1 - (1 - a)^R) / a + (1 - a)^R q_P(t), a = q_L(A)."""
    q_l = np.array([0.4, 0.3, 0.2, 0.1])
    q_p = np.array([0.1, 0.5, 0.3, 0.1])
    tau, draws, n = 0.25, 2, 40_000
    acceptable = q_p >= tau
    a = q_l[acceptable].sum()
    expected = q_l * acceptable * (1 - (1 - a) ** draws) / a + (1 - a) ** draws * q_p
    u = torch.from_numpy(keyed_uniforms(3, np.arange(n), np.zeros((n, 1)), draws + 1)[:, 0])
    d = mixed_policy_decisions(
        dist([logits_for(list(q_l))] * n), dist([logits_for(list(q_p))] * n), u, tau=tau
    )
    freq = np.bincount(d.token_ids.numpy(), minlength=4) / n
    assert np.allclose(freq, expected, atol=0.01), (freq, expected)
    assert abs(float((~d.accepted).float().mean()) - (1 - a) ** draws) < 0.01


def test_guesses_equal_the_outcome_when_they_are_certain():
    prop, ver = [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]
    u = torch.tensor([[0.2, 0.9, 0.5]], dtype=torch.float64)
    p, v = dist([logits_for(prop)]), dist([logits_for(ver)])
    outcome = mixed_policy_decisions(p, v, u, tau=0.0)
    assert int(proposer_guess(p, u)[0]) == int(outcome.token_ids[0])
    # Nothing clears tau = 0.5, so the outcome is the verifier's fallback sample.
    outcome = mixed_policy_decisions(p, v, u, tau=0.5)
    assert int(verifier_guess(v, u, tau=0.5, acceptance="full")[0]) == int(outcome.token_ids[0])


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_decisions_are_vectorised_row_by_row(tau: float):
    rng = np.random.default_rng(0)
    logits_p = torch.from_numpy(rng.normal(size=(6, 30)) * 2)
    logits_v = torch.from_numpy(rng.normal(size=(6, 30)) * 2)
    u = torch.from_numpy(keyed_uniforms(0, np.arange(6), np.zeros((6, 1)), 6)[:, 0])
    settings = {"temperature": 0.7, "top_k": 5, "top_p": 0.9}
    together = mixed_policy_decisions(
        next_token_distributions(logits_p, **settings),
        next_token_distributions(logits_v, **settings),
        u,
        tau=tau,
    )
    for row in range(6):
        alone = mixed_policy_decisions(
            next_token_distributions(logits_p[row : row + 1], **settings),
            next_token_distributions(logits_v[row : row + 1], **settings),
            u[row : row + 1],
            tau=tau,
        )
        assert int(alone.token_ids[0]) == int(together.token_ids[row])
        assert int(alone.draws[0]) == int(together.draws[row])
