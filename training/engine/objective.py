"""The training objectives of DAIL step 2, as pure functions of logit tensors.

    reverse (default):  L = mean_t [ KL(M_theta || M_PS) - gamma * KL(M_theta || M_NR) ]
    forward:            L = mean_t [ KL(M_PS || M_theta) - gamma * KL(M_NR || M_theta) ]

over the response positions t, with the full vocabulary at every position. `nll_loss` is the
plain SFT baseline on the same response tokens.

How the mean is taken (`normalisation`):
- "per_sequence" (the release, the config's default): the mean over each sequence's response
  positions, then the mean over the sequences of the whole accumulated batch. The release trains
  with batch size 1 per device, `F.kl_div(..., reduction="batchmean")` over that sequence's
  positions, and transformers' gradient accumulation divides each micro-batch's loss by the
  number of accumulation steps: a mean over sequences. Every trace weighs the same.
- "per_token": the sum over all response positions of the accumulated batch divided by their
  number, so a long trace weighs more than a short one.
Under gradient accumulation the caller passes `normaliser` = `loss_items(...)` of the whole
accumulated batch (tokens, or sequences), so micro-batching never changes the loss.

Every function takes logits that are already aligned: `(B, T, V)` tensors whose row `t` is the
distribution over response token `t` in each view. This module knows nothing about models,
prompts, tokenizers or padding layouts (the collator and the trainer line the views up), and
nothing about gradient accumulation beyond the `normaliser` it is given.

Implementation note: `dail_loss` computes the gradient with respect to the learner logits in
its forward pass, in chunks of positions, and keeps only that one `(B, T, V)` tensor for the
backward pass (as fused cross-entropy kernels do). A plain autograd graph of the same formula
would keep five or six `(B, T, V)` intermediates alive; the value and the gradient are the same,
which the tests check against a direct float64 computation of the formula.

Departures from the paper:
- `pull_mask` (reviewer-marked shortcut tokens left out of the pull toward PS) is ours; the
  paper has no reviewer. Positions outside `pull_mask` keep only the push term, which alone is
  minimised by putting all mass on the token NR finds least likely (usually junk): for reverse
  KL the push is bounded (KL(q||p_NR) <= -log min_v p_NR(v)) but its minimiser is that junk
  token; for forward KL it is not bounded below at all. That is why `loss_masks`' default
  policy is "drop_position" (marked positions leave the loss) and "drop_pull" is an option.
  The forward direction is unbounded below on every position where gamma * p_NR(v) > p_PS(v);
  the release uses reverse KL.
- Gradients flow only into the learner logits: PS and NR are the frozen base model by
  definition, so their logits are treated as constants even if they carry a graph.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Direction = Literal["reverse", "forward"]
Normalisation = Literal["per_sequence", "per_token"]

# Elements of one (rows, V) float32 temporary in `dail_loss` (32 MiB); about six are alive at
# once. Smaller chunks mean more kernel launches on a GPU (55 rows per chunk at V = 151,936).
CHUNK_ELEMENTS = 1 << 23


def log_probs(logits: Tensor) -> Tensor:
    """Log-softmax over the last axis, in float32 for half-precision input (float64 stays).

    Idempotent: log-probabilities pass through unchanged (up to rounding)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1)


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) = sum_v p(v) * (log p(v) - log q(v)) at every position, over the full vocabulary.

    `p_logits`, `q_logits`: `(..., V)` logits or log-probabilities of the same shape (both are
    normalised with log-softmax first). Returns `(...)`. The expectation is under the FIRST
    argument. Beware that `F.kl_div(input, target)` computes the opposite order,
    KL(target || input); this helper exists so that nothing else in the engine calls it.
    Terms with p(v) = 0 contribute 0 (the limit), also when log p(v) = -inf.
    """
    log_p = log_probs(p_logits)  # (..., V)
    log_q = log_probs(q_logits)  # (..., V)
    p = log_p.exp()  # (..., V)
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (...)


def _zero_loss(logits: Tensor, metric_names: tuple[str, ...]) -> tuple[Tensor, dict[str, float]]:
    """Nothing to learn from: a zero that still has a graph, so backward() works everywhere."""
    metrics = dict.fromkeys(metric_names, 0.0)
    metrics["tokens"] = 0.0
    return logits.sum() * 0, metrics


class _ContrastiveKL(torch.autograd.Function):
    """Per sequence, the sum over masked positions of `pull * KL_a - gamma * KL_b`; gradient
    into the learner only.

    forward returns (sequence_sums, kl_privileged, kl_negative): `(B,)`, then two `(B, T)`
    non-differentiable tensors. The gradient w.r.t. the learner logits z at one position, with
    q = softmax(z), p = p_PS, n = p_NR and w = pull weight, is
      reverse: q * (g - E_q[g]),  g = w * (log q - log p) - gamma * (log q - log n)
      forward: w * (q - p) - gamma * (q - n)
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        learner_logits: Tensor,
        privileged_logits: Tensor,
        negative_logits: Tensor,
        loss_mask: Tensor,
        pull_mask: Tensor,
        gamma: float,
        reverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, length, vocab = learner_logits.shape
        learner = learner_logits.detach().reshape(-1, vocab)  # (B*T, V)
        privileged = privileged_logits.detach().reshape(-1, vocab)  # (B*T, V)
        negative = negative_logits.detach().reshape(-1, vocab)  # (B*T, V)
        work_dtype = torch.float64 if learner.dtype == torch.float64 else torch.float32
        counted = loss_mask.reshape(-1).to(work_dtype)  # (B*T,) 1 where the position counts
        pulled = (pull_mask & loss_mask).reshape(-1).to(work_dtype)  # (B*T,)

        # Contiguous chunks of rows (views, no gathers); padding rows get weight 0 and, when
        # there are any, are zeroed explicitly so that whatever they hold (even inf) is ignored.
        has_padding = not bool(loss_mask.all())
        grad = torch.empty_like(learner)  # (B*T, V)
        kl_priv = learner.new_empty(batch * length, dtype=work_dtype)  # (B*T,)
        kl_neg = torch.empty_like(kl_priv)  # (B*T,)
        per_position = torch.empty_like(kl_priv)  # (B*T,)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, batch * length, step):
            rows = slice(start, start + step)
            log_q = log_probs(learner[rows])  # (n, V)
            log_p = log_probs(privileged[rows])  # (n, V)
            log_n = log_probs(negative[rows])  # (n, V)
            pull, count = pulled[rows, None], counted[rows, None]  # (n, 1)
            q = log_q.exp()  # (n, V)
            if reverse:
                diff_p = log_q - log_p  # (n, V)
                diff_n = log_q.sub_(log_n)  # (n, V); log_q is not needed any more
                kl_p = torch.linalg.vecdot(q, diff_p)  # (n,) KL(q || p)
                kl_n = torch.linalg.vecdot(q, diff_n)  # (n,) KL(q || n)
                expected = pull[:, 0] * kl_p - gamma * count[:, 0] * kl_n  # (n,) = E_q[g]
                integrand = diff_p.mul_(pull).sub_(diff_n.mul_(count), alpha=gamma)  # (n, V) g
                chunk_grad = q.mul_(integrand.sub_(expected[:, None]))  # (n, V)
            else:
                p = log_p.exp()  # (n, V)
                n = log_n.exp()  # (n, V)
                kl_p = torch.linalg.vecdot(p, log_p - log_q)  # (n,) KL(p || q)
                kl_n = torch.linalg.vecdot(n, log_n - log_q)  # (n,) KL(n || q)
                expected = pull[:, 0] * kl_p - gamma * count[:, 0] * kl_n  # (n,)
                # w (q - p) - gamma c (q - n) = (w - gamma c) q - w p + gamma c n
                chunk_grad = q.mul_(pull - gamma * count)  # (n, V)
                chunk_grad.sub_(p.mul_(pull)).add_(n.mul_(count), alpha=gamma)
            if has_padding:
                keep = count > 0  # (n, 1)
                chunk_grad = torch.where(keep, chunk_grad, 0.0)
                expected = torch.where(keep[:, 0], expected, 0.0)
            grad[rows] = chunk_grad
            kl_priv[rows], kl_neg[rows], per_position[rows] = kl_p, kl_n, expected
        sequence_sums = per_position.view(batch, length).sum(1)  # (B,)

        ctx.save_for_backward(grad.view(batch, length, vocab))
        kl_priv = kl_priv.view(batch, length)  # (B, T)
        kl_neg = kl_neg.view(batch, length)  # (B, T)
        ctx.mark_non_differentiable(kl_priv, kl_neg)
        return sequence_sums, kl_priv, kl_neg

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_sums: Tensor,
        _grad_kl_priv: Tensor | None,
        _grad_kl_neg: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors  # (B, T, V)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        learner_grad = grad * grad_sums.to(grad.dtype)[:, None, None]  # (B, T, V)
        return learner_grad, None, None, None, None, None, None


def loss_items(loss_mask: Tensor, normalisation: Normalisation = "per_token") -> int:
    """What a batch counts toward the normaliser: its response positions ("per_token") or its
    sequences with at least one position in the loss ("per_sequence"). `loss_mask`: `(B, T)`."""
    _check_normalisation(normalisation)
    mask = loss_mask.bool()  # (B, T)
    return int(mask.sum()) if normalisation == "per_token" else int(mask.any(1).sum())


def _normalised(
    sequence_sums: Tensor,
    mask: Tensor,
    normalisation: Normalisation,
    normaliser: int | float | Tensor | None,
) -> Tensor:
    """The scalar loss from per-sequence sums `(B,)` and the loss mask `(B, T)`."""
    if normalisation == "per_token":
        return sequence_sums.sum() / (
            loss_items(mask, "per_token") if normaliser is None else normaliser
        )
    lengths = mask.sum(1)  # (B,) positions in the loss per sequence
    present = lengths > 0  # (B,)
    per_sequence = sequence_sums[present] / lengths[present].to(sequence_sums.dtype)  # (B',)
    count = int(present.sum()) if normaliser is None else normaliser
    return per_sequence.sum() / count


def _check_normalisation(normalisation: str) -> None:
    if normalisation not in ("per_sequence", "per_token"):
        raise ValueError(
            f"normalisation must be 'per_sequence' or 'per_token'; got {normalisation!r}"
        )


def dail_loss(
    learner_logits: Tensor,
    privileged_logits: Tensor,
    negative_logits: Tensor,
    response_mask: Tensor,
    gamma: float = 0.1,
    direction: Direction = "reverse",
    pull_mask: Tensor | None = None,
    normaliser: int | float | Tensor | None = None,
    normalisation: Normalisation = "per_token",
) -> tuple[Tensor, dict[str, float]]:
    """The DAIL contrastive loss of one (micro-)batch.

    Args:
        learner_logits: `(B, T, V)` M_theta at the response positions (adapter on, with grad).
        privileged_logits: `(B, T, V)` M_PS at the same positions (frozen; no gradient).
        negative_logits: `(B, T, V)` M_NR at the same positions (frozen; no gradient).
        response_mask: `(B, T)` bool, True at the response tokens that count.
        gamma: the cheating penalty; 0 gives plain distillation toward PS.
        direction: "reverse" (default, the release) or "forward" (see the module docstring).
        pull_mask: `(B, T)` bool, True where the pull toward PS applies. Default None: the pull
            applies at every response position. Positions False here keep only the push term.
        normaliser: what the loss is divided by after the per-sequence or per-token sums:
            `loss_items(mask, normalisation)` of the whole accumulated batch under gradient
            accumulation. Default: that count for this batch alone.
        normalisation: "per_token" (sum over positions / normaliser) or "per_sequence"
            (each sequence's sum divided by its number of positions, summed / normaliser);
            see the module docstring. The training config's default is "per_sequence".

    Returns:
        `(loss, metrics)`: the scalar loss, and detached floats that are means over THIS
        batch's response positions whatever the normaliser: `total` (the loss per position),
        `kl_privileged` and `kl_negative` (the two KL terms over all response positions, pull
        mask or not) and `tokens` (the number of response positions). A batch with no response
        position returns `learner_logits.sum() * 0` (a zero with a graph) and zero metrics.
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward'; got {direction!r}")
    _check_normalisation(normalisation)
    if not learner_logits.shape == privileged_logits.shape == negative_logits.shape:
        raise ValueError(
            "the three views' logits must have one shape (B, T, V); got "
            f"{tuple(learner_logits.shape)}, {tuple(privileged_logits.shape)}, "
            f"{tuple(negative_logits.shape)}"
        )
    names = ("total", "kl_privileged", "kl_negative")
    mask = response_mask.bool()  # (B, T)
    tokens = int(mask.sum())
    if tokens == 0:
        return _zero_loss(learner_logits, names)
    pull = mask if pull_mask is None else mask & pull_mask.bool()  # (B, T)
    sequence_sums, kl_priv, kl_neg = _ContrastiveKL.apply(
        learner_logits,
        privileged_logits,
        negative_logits,
        mask,
        pull,
        gamma,
        direction == "reverse",
    )
    loss = _normalised(sequence_sums, mask, normalisation, normaliser)
    loss_sum = sequence_sums.detach().sum()
    values = torch.stack([loss_sum, kl_priv[mask].sum(), kl_neg[mask].sum()]) / tokens
    metrics = dict(zip(names, values.tolist(), strict=True))
    metrics["tokens"] = float(tokens)
    return loss, metrics


def nll_loss(
    learner_logits: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    normaliser: int | float | Tensor | None = None,
    normalisation: Normalisation = "per_token",
) -> tuple[Tensor, dict[str, float]]:
    """Plain SFT baseline: -log M_theta(r_t) over the response tokens, normalised as in
    `dail_loss` (`normaliser`, `normalisation`).

    `learner_logits` `(B, T, V)` row t predicts `response_ids[:, t]` `(B, T)`; `response_mask`
    `(B, T)` selects the tokens that count. Metrics: `total` (= `nll`, the mean over this
    batch's tokens) and `tokens`."""
    _check_normalisation(normalisation)
    mask = response_mask.bool()  # (B, T)
    tokens = int(mask.sum())
    if tokens == 0:
        return _zero_loss(learner_logits, ("total", "nll"))
    logits = learner_logits
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # (B, T, V)
    targets = response_ids.masked_fill(~mask, -100)  # (B, T)
    per_position = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
    )  # (B*T,), 0 where ignored
    sequence_sums = per_position.view(mask.shape).sum(1)  # (B,)
    loss = _normalised(sequence_sums, mask, normalisation, normaliser)
    mean = sequence_sums.detach().sum().item() / tokens
    return loss, {"total": mean, "nll": mean, "tokens": float(tokens)}


def loss_masks(
    response_mask: Tensor,
    shortcut_mask: Tensor | None,
    objective: str,
    shortcut_policy: str,
) -> tuple[Tensor, Tensor]:
    """Which response positions count (`loss_mask`) and which are pulled toward PS (`pull_mask`).

    `response_mask`, `shortcut_mask`: `(B, T)` bool (shortcut = reviewer-marked span).
    Policies: "drop_position" (the default) removes them from the loss: no gradient there;
    "drop_pull" leaves shortcut tokens out of the pull but keeps them in the loss with only the
    push away from NR, whose minimiser is NR's least likely token (for NLL, which is all pull,
    that removes them); "keep" ignores the marks. Both returned masks are `(B, T)` bool.
    """
    mask = response_mask.bool()  # (B, T)
    if shortcut_mask is None or shortcut_policy == "keep":
        return mask, mask
    clean = mask & ~shortcut_mask.bool()  # (B, T)
    if shortcut_policy == "drop_position" or objective == "nll":
        return clean, clean
    if shortcut_policy == "drop_pull":
        return mask, clean
    raise ValueError(f"unknown shortcut_policy {shortcut_policy!r}")
