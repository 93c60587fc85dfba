"""The reviewer's writes: handing out traces, verdicts (with history), shortcut spans.

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

from dailweb.errors import ConflictError, DomainError
from expansion.models import ReviewState, ShortcutSpan, Trace, Verdict

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
    *, trace_id: int, reviewer, decision: str, note: str = "", base_revision: int | None = None
) -> Verdict:
    """Record a verdict; refuses (ConflictError) when the trace changed since `base_revision`."""
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
def shortcut_span_delete(*, span_id: int, reviewer) -> None:
    ShortcutSpan.objects.filter(pk=span_id).delete()
