"""The DAIL objective against a direct float64 computation of the formula in DAIL_METHOD.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.engine import objective
from training.engine.objective import dail_loss, kl_divergence, loss_masks, nll_loss

pytestmark = pytest.mark.engine

B, T, V = 3, 5, 11


def random_views(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    learner, privileged, negative = (
        (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype) for _ in range(3)
    )
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False  # a shorter response
    mask[2, 1:] = False
    return learner.requires_grad_(), privileged, negative, mask


def formula(learner, privileged, negative, mask, gamma, direction, pull=None, normaliser=None):
    """The loss written out term by term, in float64, with no shortcut of any kind."""
    lq, lp, ln = (F.log_softmax(x.double(), -1) for x in (learner, privileged, negative))
    q, p, n = lq.exp(), lp.exp(), ln.exp()
    if direction == "reverse":
        kl_priv = (q * (lq - lp)).sum(-1)  # KL(M_theta || M_PS)
        kl_neg = (q * (lq - ln)).sum(-1)  # KL(M_theta || M_NR)
    else:
        kl_priv = (p * (lp - lq)).sum(-1)  # KL(M_PS || M_theta)
        kl_neg = (n * (ln - lq)).sum(-1)  # KL(M_NR || M_theta)
    weight = mask.double() if pull is None else (mask & pull).double()
    total = (weight * kl_priv).sum() - gamma * (mask.double() * kl_neg).sum()
    return total / (mask.sum() if normaliser is None else normaliser)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("with_pull_mask", [False, True])
def test_loss_and_gradient_match_the_formula(direction, gamma, with_pull_mask):
    learner, privileged, negative, mask = random_views(seed=1)
    pull = None
    if with_pull_mask:
        pull = torch.ones(B, T, dtype=torch.bool)
        pull[1, 1:3] = False  # a reviewer-marked shortcut span
    loss, metrics = dail_loss(learner, privileged, negative, mask, gamma, direction, pull)
    (grad,) = torch.autograd.grad(loss, learner)

    expected_learner = learner.detach().clone().requires_grad_()
    expected = formula(expected_learner, privileged, negative, mask, gamma, direction, pull)
    (expected_grad,) = torch.autograd.grad(expected, expected_learner)

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert metrics["total"] == pytest.approx(expected.item(), rel=1e-9)
    assert metrics["tokens"] == mask.sum().item()
    assert grad[~mask].abs().max() == 0  # padding positions get no gradient


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_metrics_are_the_two_kl_terms(direction):
    learner, privileged, negative, mask = random_views(seed=2)
    _, metrics = dail_loss(learner, privileged, negative, mask, 0.1, direction)
    if direction == "reverse":
        kl_priv = kl_divergence(learner.detach(), privileged)
        kl_neg = kl_divergence(learner.detach(), negative)
    else:
        kl_priv = kl_divergence(privileged, learner.detach())
        kl_neg = kl_divergence(negative, learner.detach())
    assert metrics["kl_privileged"] == pytest.approx(kl_priv[mask].mean().item(), rel=1e-9)
    assert metrics["kl_negative"] == pytest.approx(kl_neg[mask].mean().item(), rel=1e-9)
    assert metrics["total"] == pytest.approx(
        metrics["kl_privileged"] - 0.1 * metrics["kl_negative"], rel=1e-9
    )


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_gamma_zero_is_distillation_toward_the_privileged_view(direction):
    learner, privileged, negative, mask = random_views(seed=3)
    loss, _ = dail_loss(learner, privileged, negative, mask, gamma=0.0, direction=direction)
    other_negative = torch.randn_like(negative)
    loss_other, _ = dail_loss(learner, privileged, other_negative, mask, 0.0, direction)
    pair = (learner, privileged) if direction == "reverse" else (privileged, learner)
    distillation = kl_divergence(*pair)[mask].mean()
    torch.testing.assert_close(loss, distillation, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_other, loss)  # NR has no say when gamma = 0


def test_reverse_objective_is_stationary_at_its_closed_form_minimiser():
    # sum q (log q - log p) - gamma sum q (log q - log n) is minimised, for gamma < 1, by
    # q ∝ (p / n^gamma)^(1 / (1 - gamma)); the gradient there must vanish.
    _, privileged, negative, mask = random_views(seed=4)
    gamma = 0.3
    lp, ln = F.log_softmax(privileged, -1), F.log_softmax(negative, -1)
    minimiser = ((lp - gamma * ln) / (1 - gamma)).requires_grad_()
    loss, _ = dail_loss(minimiser, privileged, negative, mask, gamma)
    (grad,) = torch.autograd.grad(loss, minimiser)
    assert grad.abs().max() < 1e-12
    nudged = (minimiser.detach() + 0.05 * torch.randn_like(minimiser)).requires_grad_()
    assert dail_loss(nudged, privileged, negative, mask, gamma)[0] > loss


def test_accumulated_micro_batches_weigh_every_token_the_same():
    learner, privileged, negative, mask = random_views(seed=5)
    whole, _ = dail_loss(learner, privileged, negative, mask)
    (whole_grad,) = torch.autograd.grad(whole, learner)

    total_tokens = int(mask.sum())
    parts = [slice(0, 1), slice(1, 3)]  # micro-batches of unequal token counts
    accumulated = sum(
        dail_loss(learner[s], privileged[s], negative[s], mask[s], normaliser=total_tokens)[0]
        for s in parts
    )
    (accumulated_grad,) = torch.autograd.grad(accumulated, learner)
    torch.testing.assert_close(accumulated, whole)
    torch.testing.assert_close(accumulated_grad, whole_grad)

    # The per-micro-batch mean (the classic accumulation bug) gives a different loss.
    naive = sum(dail_loss(learner[s], privileged[s], negative[s], mask[s])[0] for s in parts) / 2
    assert not torch.isclose(naive, whole)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_chunked_computation_equals_one_chunk(monkeypatch, direction):
    learner, privileged, negative, mask = random_views(seed=6)
    loss, metrics = dail_loss(learner, privileged, negative, mask, 0.1, direction)
    (grad,) = torch.autograd.grad(loss, learner)
    monkeypatch.setattr(objective, "CHUNK_ELEMENTS", 2 * V)  # two positions per chunk
    chunked, chunked_metrics = dail_loss(learner, privileged, negative, mask, 0.1, direction)
    (chunked_grad,) = torch.autograd.grad(chunked, learner)
    torch.testing.assert_close(chunked, loss)
    torch.testing.assert_close(chunked_grad, grad)
    assert chunked_metrics == pytest.approx(metrics)


def test_all_masked_batch_returns_a_zero_with_a_graph():
    learner, privileged, negative, mask = random_views(seed=7)
    for loss, metrics in (
        dail_loss(learner, privileged, negative, torch.zeros_like(mask)),
        nll_loss(learner, torch.zeros(B, T, dtype=torch.long), torch.zeros_like(mask)),
    ):
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, learner)
        assert grad.abs().max() == 0
        assert metrics["tokens"] == 0 and metrics["total"] == 0


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_padding_positions_are_ignored_whatever_they_hold(direction):
    learner, privileged, negative, mask = random_views(seed=10)
    loss, metrics = dail_loss(learner, privileged, negative, mask, direction=direction)
    (grad,) = torch.autograd.grad(loss, learner)
    poisoned = [x.detach().clone() for x in (learner, privileged, negative)]
    for x in poisoned:
        x[~mask] = float("nan")
        x[0, -1, 0] = float("inf")  # also padding (row 0 is 3 tokens long)
    poisoned[0].requires_grad_()
    loss2, metrics2 = dail_loss(*poisoned, mask, direction=direction)
    (grad2,) = torch.autograd.grad(loss2, poisoned[0])
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    assert metrics2 == pytest.approx(metrics)


def test_half_precision_logits_give_the_float32_result():
    learner, privileged, negative, mask = random_views(seed=8)
    as_bf16 = [x.detach().to(torch.bfloat16) for x in (learner, privileged, negative)]
    as_f32 = [x.float() for x in as_bf16]  # the same values, in float32
    bf16_learner = as_bf16[0].requires_grad_()
    loss, _ = dail_loss(bf16_learner, *as_bf16[1:], mask)
    (grad,) = torch.autograd.grad(loss, bf16_learner)
    reference = formula(as_f32[0], *as_f32[1:], mask, 0.1, "reverse")
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_kl_helper_against_a_hand_computation():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.25, 0.5])
    # KL(p||q) = 0.5 ln(0.5/0.25) + 0.25 ln 1 + 0.25 ln(0.25/0.5) = 0.25 ln 2
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    # ...and logits (log-probabilities shifted by a constant) give the same value.
    assert kl_divergence(p.log() + 3.0, q.log() - 1.0).item() == pytest.approx(
        0.25 * math.log(2), rel=1e-6
    )
    # KL(q||p) = 0.25 ln(0.5) + 0 + 0.5 ln 2 = 0.25 ln 2 here too: use an asymmetric pair.
    r = torch.tensor([0.7, 0.2, 0.1])
    hand_pr = sum(a * math.log(a / b) for a, b in zip(p.tolist(), r.tolist(), strict=True))
    hand_rp = sum(b * math.log(b / a) for a, b in zip(p.tolist(), r.tolist(), strict=True))
    assert kl_divergence(p.log(), r.log()).item() == pytest.approx(hand_pr, rel=1e-6)
    assert kl_divergence(r.log(), p.log()).item() == pytest.approx(hand_rp, rel=1e-6)
    assert abs(hand_pr - hand_rp) > 0.01  # the order matters for this pair
    # torch's kl_div(input, target) is KL(target || input): the reverse argument order.
    torch_order = F.kl_div(r.log(), p.log(), log_target=True, reduction="sum")
    assert torch_order.item() == pytest.approx(hand_pr, rel=1e-6)


def test_kl_helper_treats_zero_probability_terms_as_zero():
    p_logits = torch.tensor([0.0, float("-inf"), 0.0])
    q_logits = torch.tensor([0.0, 0.0, 1.0])
    value = kl_divergence(p_logits, q_logits)
    expected = sum(0.5 * math.log(0.5 / qv) for qv in F.softmax(q_logits, -1)[[0, 2]].tolist())
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_nll_matches_the_log_likelihood_of_the_response_tokens():
    learner, _, _, mask = random_views(seed=9)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    loss, metrics = nll_loss(learner, targets, mask, normaliser=20)
    log_p = F.log_softmax(learner.detach(), -1).gather(-1, targets[..., None])[..., 0]
    assert loss.item() == pytest.approx(-log_p[mask].sum().item() / 20, rel=1e-10)
    assert metrics["nll"] == pytest.approx(-log_p[mask].mean().item(), rel=1e-10)


def test_loss_masks_apply_the_shortcut_policy():
    response = torch.tensor([[True, True, True, False]])
    shortcut = torch.tensor([[False, True, False, False]])
    clean = torch.tensor([[True, False, True, False]])
    loss_mask, pull = loss_masks(response, shortcut, "dail", "drop_pull")
    assert loss_mask.equal(response) and pull.equal(clean)
    loss_mask, pull = loss_masks(response, shortcut, "dail", "drop_position")
    assert loss_mask.equal(clean) and pull.equal(clean)
    loss_mask, pull = loss_masks(response, shortcut, "nll", "drop_pull")
    assert loss_mask.equal(clean) and pull.equal(clean)
    loss_mask, pull = loss_masks(response, shortcut, "dail", "keep")
    assert loss_mask.equal(response) and pull.equal(response)
    loss_mask, pull = loss_masks(response, None, "dail", "drop_pull")
    assert loss_mask.equal(response) and pull.equal(response)


def test_bad_arguments_are_refused():
    learner, privileged, negative, mask = random_views()
    with pytest.raises(ValueError, match="direction"):
        dail_loss(learner, privileged, negative, mask, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one shape"):
        dail_loss(learner, privileged[:, :2], negative, mask)
    with pytest.raises(ValueError, match="normalisation"):
        dail_loss(learner, privileged, negative, mask, normalisation="per_word")  # type: ignore[arg-type]


# ---- loss normalisation --------------------------------------------------------------------


def two_sequences_of_different_lengths():
    """Sequence 0 has one response position where the learner says (0.75, 0.25); sequence 1
    has three positions where it says (0.5, 0.5). PS and NR are uniform everywhere."""
    learner = torch.zeros(2, 3, 2, dtype=torch.float64)
    learner[0, 0] = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64)  # (0.75, 0.25)
    reference = torch.zeros(2, 3, 2, dtype=torch.float64)  # uniform
    mask = torch.tensor([[True, False, False], [True, True, True]])
    return learner.requires_grad_(), reference, mask


def test_per_sequence_and_per_token_normalisation_by_hand():
    learner, reference, mask = two_sequences_of_different_lengths()
    # KL((0.75, 0.25) || (0.5, 0.5)) by hand; the uniform positions of sequence 1 give 0.
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    per_token, _ = dail_loss(learner, reference, reference, mask, 0.0, normalisation="per_token")
    per_sequence, metrics = dail_loss(
        learner, reference, reference, mask, 0.0, normalisation="per_sequence"
    )
    assert per_token.item() == pytest.approx(kl / 4, rel=1e-12)  # (kl + 0 + 0 + 0) / 4 tokens
    assert per_sequence.item() == pytest.approx((kl / 1 + 0 / 3) / 2, rel=1e-12)  # 2 sequences
    assert metrics["total"] == pytest.approx(kl / 4, rel=1e-12)  # metrics stay per token

    # The gradient at sequence 0's position is weighted 1/4 per token, 1/(1 * 2) per sequence.
    (g_token,) = torch.autograd.grad(per_token, learner)
    (g_sequence,) = torch.autograd.grad(per_sequence, learner)
    torch.testing.assert_close(g_sequence[0, 0], 2 * g_token[0, 0])
    assert g_token[0, 0].abs().sum() > 0

    # The NLL baseline the same way: -log 0.75 on sequence 0, -log 0.5 three times on 1.
    targets = torch.zeros(2, 3, dtype=torch.long)
    nll_token, _ = nll_loss(learner, targets, mask, normalisation="per_token")
    nll_sequence, _ = nll_loss(learner, targets, mask, normalisation="per_sequence")
    a, b = -math.log(0.75), -math.log(0.5)
    assert nll_token.item() == pytest.approx((a + 3 * b) / 4, rel=1e-12)
    assert nll_sequence.item() == pytest.approx((a / 1 + 3 * b / 3) / 2, rel=1e-12)


@pytest.mark.parametrize("normalisation", ["per_sequence", "per_token"])
def test_accumulated_micro_batches_equal_the_whole_batch_in_both_normalisations(normalisation):
    learner, privileged, negative, mask = random_views(seed=12)
    whole, _ = dail_loss(learner, privileged, negative, mask, 0.2, normalisation=normalisation)
    (whole_grad,) = torch.autograd.grad(whole, learner)
    items = objective.loss_items(mask, normalisation)
    assert items == (int(mask.sum()) if normalisation == "per_token" else B)
    parts = [slice(0, 1), slice(1, 3)]
    accumulated = sum(
        dail_loss(
            learner[s], privileged[s], negative[s], mask[s], 0.2,
            normaliser=items, normalisation=normalisation,
        )[0]
        for s in parts
    )  # fmt: skip
    (accumulated_grad,) = torch.autograd.grad(accumulated, learner)
    torch.testing.assert_close(accumulated, whole)
    torch.testing.assert_close(accumulated_grad, whole_grad)
    # And the per-sequence value is the mean over sequences of each one's per-token mean.
    if normalisation == "per_sequence":
        means = [
            dail_loss(learner[i : i + 1], privileged[i : i + 1], negative[i : i + 1],
                      mask[i : i + 1], 0.2)[0]
            for i in range(B)
        ]  # fmt: skip
        torch.testing.assert_close(whole, sum(means) / B)


def test_a_sequence_with_no_position_in_the_loss_is_not_counted():
    learner, privileged, negative, mask = random_views(seed=13)
    mask[1] = False
    assert objective.loss_items(mask, "per_sequence") == 2
    loss, _ = dail_loss(learner, privileged, negative, mask, normalisation="per_sequence")
    kept = [0, 2]
    expected = (
        sum(
            dail_loss(
                learner[i : i + 1], privileged[i : i + 1], negative[i : i + 1], mask[i : i + 1]
            )[0]
            for i in kept
        )
        / 2
    )
    torch.testing.assert_close(loss, expected)


# ---- shortcut-span policies on a tiny model ------------------------------------------------


def train_logit_table(policy: str, steps: int = 150, gamma: float = 0.1):
    """A tiny model: a learnable table of logits for two response positions, trained with the
    DAIL loss where position 1 is reviewer-marked. Returns (initial, trained logits, PS, NR,
    gradient of the first step)."""
    g = torch.Generator().manual_seed(3)
    vocab = 6
    privileged = torch.randn(1, 2, vocab, generator=g, dtype=torch.float64) * 2
    negative = torch.randn(1, 2, vocab, generator=g, dtype=torch.float64) * 2
    table = torch.nn.Parameter(torch.randn(1, 2, vocab, generator=g, dtype=torch.float64))
    initial = table.detach().clone()
    response = torch.ones(1, 2, dtype=torch.bool)
    shortcut = torch.tensor([[False, True]])
    loss_mask, pull = loss_masks(response, shortcut, "dail", policy)
    optimizer = torch.optim.Adam([table], lr=0.2)
    first_grad = None
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = dail_loss(table, privileged, negative, loss_mask, gamma, "reverse", pull)
        loss.backward()
        if first_grad is None:
            first_grad = table.grad.detach().clone()
        optimizer.step()
    return initial, table.detach(), privileged, negative, first_grad


def test_drop_pull_alone_drives_a_marked_position_toward_nrs_least_likely_token():
    _, trained, privileged, negative, _ = train_logit_table("drop_pull")
    q = F.softmax(trained[0, 1], -1)
    junk = int(negative[0, 1].argmin())
    assert junk != int(privileged[0, 1].argmax())  # the junk token is not what PS would say
    assert q[junk] > 0.95  # the push alone piles the mass onto NR's least likely token


def test_drop_position_leaves_a_marked_position_untouched():
    initial, trained, _, _, first_grad = train_logit_table("drop_position")
    assert first_grad[0, 1].abs().max().item() == 0.0  # no gradient at the marked position
    assert first_grad[0, 0].abs().max().item() > 0  # the other position still learns
    assert torch.equal(trained[0, 1], initial[0, 1])


@pytest.mark.parametrize("policy", ["keep", "drop_position", "drop_pull"])
def test_every_policy_trains_unmarked_positions_to_the_closed_form_minimiser(policy):
    gamma = 0.1
    _, trained, privileged, negative, _ = train_logit_table(policy, gamma=gamma)
    lp, ln = F.log_softmax(privileged, -1), F.log_softmax(negative, -1)
    target = F.softmax((lp - gamma * ln) / (1 - gamma), -1)  # argmin of KL(q||p) - g KL(q||n)
    torch.testing.assert_close(F.softmax(trained[0, 0], -1), target[0, 0], atol=1e-3, rtol=0)
    if policy == "keep":  # the marked position trains like any other
        torch.testing.assert_close(F.softmax(trained[0, 1], -1), target[0, 1], atol=1e-3, rtol=0)
