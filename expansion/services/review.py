"""The reviewer's writes: handing out traces, verdicts (with history), shortcut spans (a span
is deleted only by its author or an admin, and its row stays as history).

Concurrent verdicts on one trace: every verdict form carries the trace revision it was based
on. If another reviewer recorded a verdict in between, the save is refused with a conflict
message naming who decided what (nothing is overwritten silently); submitting again, now on
the new revision, records the second verdict too. The history keeps every verdict, and the
trace's state is the latest one.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from dailweb.errors import ConflictError, DomainError, ForbiddenError
from dailweb.roles import Role, has_role
from expansion.models import ReviewState, ShortcutSpan, Trace, Verdict
from expansion.selectors import trace_accept_concerns

CLAIM_MINUTES = 15
DECISIONS = (ReviewState.ACCEPTED, ReviewState.REJECTED, ReviewState.NEEDS_FIX)


def trace_claim_next(
    *, reviewer, run_id: int | None = None, after_trace_id: int | None = None
) -> Trace | None:
    """Hand the reviewer the next unreviewed trace nobody else holds, and hold it for them.

    Two reviewers asking at the same time get different traces: the row is locked while it is
    claimed (SKIP LOCKED where the database has it), and a claim expires after 15 minutes.
    """
    expired = timezone.now() - timedelta(minutes=CLAIM_MINUTES)
    with transaction.atomic():
        candidates = Trace.objects.filter(review_state=ReviewState.UNREVIEWED).exclude(
            claimed_at__gt=expired, claimed_by__isnull=False
        ) | Trace.objects.filter(review_state=ReviewState.UNREVIEWED, claimed_by=reviewer)
        if run_id:
            candidates = candidates.filter(run_id=run_id)
        if after_trace_id:
            candidates = candidates.exclude(pk=after_trace_id)
        locking = (
            {"skip_locked": True} if connection.features.has_select_for_update_skip_locked else {}
        )
        trace = (
            candidates.order_by("run_id", "run_problem__position", "sample_index", "pk")
            .select_for_update(**locking)
            .defer("data")
            .first()
        )
        if trace is None:
            return None
        Trace.objects.filter(pk=trace.pk).update(claimed_by=reviewer, claimed_at=timezone.now())
    return trace


@transaction.atomic
def verdict_record(
    *,
    trace_id: int,
    reviewer,
    decision: str,
    note: str = "",
    base_revision: int | None = None,
    confirm_incorrect: bool = False,
) -> Verdict:
    """Record a verdict; refuses (ConflictError) when the trace changed since `base_revision`,
    and refuses to accept a trace whose answer is wrong, missing or cut off
    (`selectors.trace_accept_concerns`) unless `confirm_incorrect` says the reviewer meant it:
    training reads accepted traces."""
    if decision not in DECISIONS:
        raise DomainError(f"Unknown verdict {decision!r}; choose accept, reject or needs fix.")
    trace = Trace.objects.select_for_update().defer("data").get(pk=trace_id)
    if base_revision is not None and base_revision != trace.revision:
        latest = trace.verdicts.select_related("reviewer").first()
        who = (
            f"{latest.reviewer.username} marked it {latest.get_decision_display().lower()}"
            if latest
            else "it changed"
        )
        raise ConflictError(
            f"While you were looking, {who}. Your verdict was not saved; submit it again to "
            "record it as well."
        )
    if decision == ReviewState.ACCEPTED and not confirm_incorrect:
        concerns = trace_accept_concerns(trace)
        if concerns:
            reasons = " and ".join(concerns)
            raise DomainError(
                f"Accept anyway? Training reads accepted traces, but {reasons}. "
                "Confirm to accept it.",
                field_errors={"confirm_incorrect": "; ".join(concerns)},
            )
    verdict = Verdict.objects.create(
        trace=trace, reviewer=reviewer, decision=decision, note=note.strip()
    )
    Trace.objects.filter(pk=trace.pk).update(
        review_state=decision, revision=F("revision") + 1, claimed_by=None, claimed_at=None
    )
    return verdict


@transaction.atomic
def shortcut_span_add(
    *, trace_id: int, reviewer, start_token: int, end_token: int, note: str = "", tokens: int
) -> ShortcutSpan:
    """Mark tokens [start_token, end_token) as a shortcut (with a note)."""
    if not (0 <= start_token < end_token <= tokens):
        raise DomainError(
            f"A shortcut span must lie within the trace's {tokens} tokens and not be empty."
        )
    trace = Trace.objects.select_for_update().defer("data").get(pk=trace_id)
    overlapping = trace.shortcut_spans.filter(start_token__lt=end_token, end_token__gt=start_token)
    if overlapping.exists():
        raise DomainError("That span overlaps a span already marked; delete that one first.")
    return ShortcutSpan.objects.create(
        trace=trace,
        reviewer=reviewer,
        start_token=start_token,
        end_token=end_token,
        note=note.strip(),
    )


@transaction.atomic
def shortcut_span_delete(*, span_id: int, reviewer) -> ShortcutSpan:
    """Delete a span on behalf of `reviewer`: only the reviewer who marked it or an admin may.
    The row stays as history (who deleted it, when); live readers no longer see it."""
    span = ShortcutSpan.objects.select_for_update().filter(pk=span_id).first()
    if span is None:
        raise DomainError("That span is already deleted.")
    if span.reviewer_id != reviewer.pk and not has_role(reviewer, Role.ADMIN):
        raise ForbiddenError(
            f"Only {span.reviewer.username}, who marked this span, or an admin can delete it."
        )
    span.deleted_at = timezone.now()
    span.deleted_by = reviewer
    span.save(update_fields=["deleted_at", "deleted_by"])
    return span
