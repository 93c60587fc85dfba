"""The seeded problem generator, its waypoints and answers, and `load_generated_problems`."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from curation.generated_problems import (
    FAMILIES,
    GenerationError,
    generate_family,
    generate_problems,
)
from curation.models import Dataset, Problem, SolutionVersion, Waypoint
from curation.services.suggestions import partial_solution_text, waypoints_suggest
from curation.spans import Span
from expansion.engine.answers import (
    answer_alternatives,
    judge_answer,
    judge_completion,
    last_boxed_answer,
    normalise_answer,
)
from tests.factories import make_dataset

PER_FAMILY = 40


@pytest.fixture(scope="module")
def problems():
    return generate_problems(seed=3, per_family=PER_FAMILY)


def test_the_same_seed_gives_the_same_problems(problems):
    assert generate_problems(seed=3, per_family=PER_FAMILY) == problems
    assert len(problems) == PER_FAMILY * len(FAMILIES)
    assert [p.problem_id for p in problems[:2]] == [
        f"{next(iter(FAMILIES))}-0001",
        f"{next(iter(FAMILIES))}-0002",
    ]
    assert len({p.problem_id for p in problems}) == len(problems)


def test_another_seed_gives_other_problems(problems):
    other = generate_problems(seed=4, per_family=PER_FAMILY)
    assert [p.problem_id for p in other] == [p.problem_id for p in problems]
    same = sum(a.statement == b.statement for a, b in zip(problems, other, strict=True))
    assert same < len(problems) // 4  # small families may repeat a few statements by chance


def test_a_family_does_not_depend_on_the_others_or_on_the_size(problems):
    for name in FAMILIES:
        alone = generate_problems(seed=3, per_family=5, families=[name])
        assert alone == [p for p in problems if p.family == name][:5]
        assert generate_family(name, 5, seed=3) == alone


def test_every_family_draws_distinct_problems(problems):
    for name in FAMILIES:
        statements = [p.statement for p in problems if p.family == name]
        assert len(set(statements)) == len(statements) == PER_FAMILY, name


def test_a_one_step_family_refuses_more_problems_than_it_has():
    assert FAMILIES["add2"].steps == 1 and FAMILIES["add3"].steps == 2
    every = generate_family("add2", 64, seed=3)
    assert len({p.statement for p in every}) == 64  # all 8 x 8 sums of two digits 2..9
    assert all(not p.waypoints and p.solution.count("=") == 1 for p in every)
    with pytest.raises(GenerationError, match="fewer than 65 distinct problems"):
        generate_family("add2", 65, seed=3)


def test_the_checker_accepts_every_reference_solution(problems):
    for problem in problems:
        boxed = last_boxed_answer(problem.solution)
        assert boxed == problem.answer, problem.problem_id
        assert judge_answer(boxed, problem.answer).correct, problem.problem_id
        assert judge_completion(problem.solution, problem.answer).correct, problem.problem_id
        # ...and it is not a checker that accepts anything:
        wrong = str(int(problem.answer) + 1)
        assert not judge_completion(f"$\\boxed{{{wrong}}}$", problem.answer).correct


def _is_answer_piece(text: str, answer: str) -> bool:
    compact = normalise_answer(text)
    return any(compact in normalise_answer(form) for form in answer_alternatives(answer))


def test_waypoints_lie_on_intermediate_results_never_on_the_answer(problems):
    for problem in problems:
        # Two-step families mark their intermediate result; one-step ones have none.
        assert bool(problem.waypoints) == (FAMILIES[problem.family].steps > 1), problem.problem_id
        suggested = waypoints_suggest(body=problem.solution, answer=problem.answer)
        previous_end = 0
        for start, end in problem.waypoints:
            assert previous_end <= start < end <= len(problem.solution), problem.problem_id
            previous_end = end
            text = problem.solution[start:end]
            assert text == text.strip() and "boxed" not in text
            assert not _is_answer_piece(text, problem.answer), (problem.problem_id, text)
            # The product's suggester reads the same formulas: each waypoint is (or holds)
            # one of the intermediate results it proposes.
            assert any(start <= s.start and s.end <= end for s in suggested), (
                problem.problem_id,
                text,
                [s.text_in(problem.solution) for s in suggested],
            )


def test_an_intermediate_result_is_a_waypoint():
    add_mul = generate_family("add-mul", 1, seed=0)[0]
    a_plus_b = add_mul.statement.split("(")[1].split(")")[0]
    first = eval(a_plus_b)  # noqa: S307 - two small integers and a plus sign
    assert add_mul.waypoint_texts() == [str(first)]
    assert f"= {first}$" in add_mul.solution
    linear = generate_family("linear", 1, seed=0)[0]
    (stated,) = linear.waypoint_texts()
    assert stated.count("=") == 1 and stated.split("=")[0].strip().endswith("x")
    s_tilde = partial_solution_text(
        body=linear.solution,
        answer=linear.answer,
        spans=[Span(s, e) for s, e in linear.waypoints],
    )
    assert s_tilde == (
        f"The final answer is {linear.answer}. Intermediate results used in the solution might "
        f"include: {stated}."
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_family": 0}, "problems per family must be 1..9999; got 0"),
        ({"per_family": 10_000}, "problems per family must be 1..9999; got 10000"),
        ({"seed": -1}, "the seed must be a whole number >= 0; got -1"),
        ({"families": "add3,nope"}, "unknown family 'nope'; choose from"),
        ({"families": " , "}, "choose at least one family"),
    ],
)
def test_bad_generator_arguments_say_why(kwargs, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate_problems(**kwargs)


# --- The service and the command ---------------------------------------------------------------


def load(*args: str) -> str:
    out = io.StringIO()
    call_command("load_generated_problems", *args, stdout=out)
    return out.getvalue().strip()


@pytest.mark.django_db
def test_the_command_loads_and_a_reload_updates_without_duplicates():
    families = "add2,add3"  # one step (no waypoint) and two steps
    count = 3 * 2
    output = load("--seed", "5", "--per-family", "3", "--families", families, "--dataset", "gen")
    assert output == f"gen: Imported {count} problems: {count} new, 0 updated, 0 unchanged."
    dataset = Dataset.objects.get(name="gen")
    assert dataset.kind == "verifiable"
    stored = {p.external_id: p for p in Problem.objects.filter(dataset=dataset)}
    expected = generate_problems(seed=5, per_family=3, families=families)
    assert sorted(stored) == sorted(p.problem_id for p in expected)
    for problem in expected:
        row = stored[problem.problem_id]
        version = row.versions.get()
        assert (row.statement, row.answer, version.body) == (
            problem.statement,
            problem.answer,
            problem.solution,
        )
        assert [(w.start, w.end, w.origin) for w in version.waypoints.order_by("order")] == [
            (start, end, "expert") for start, end in problem.waypoints
        ]
        assert problem.family in row.tags
        assert (row.waypoint_status != "none") == (problem.family == "add3")

    again = load("--seed", "5", "--per-family", "3", "--families", families, "--dataset", "gen")
    assert again == f"gen: Imported {count} problems: 0 new, 0 updated, {count} unchanged."

    other = load("--seed", "6", "--per-family", "4", "--families", families, "--dataset", "gen")
    assert other == f"gen: Imported 8 problems: 2 new, {count} updated, 0 unchanged."
    assert Problem.objects.filter(dataset=dataset).count() == 8
    assert Dataset.objects.filter(name="gen").count() == 1
    newest = {p.problem_id: p for p in generate_problems(seed=6, per_family=4, families=families)}
    for row in Problem.objects.filter(dataset=dataset):
        current = row.versions.get(number=row.current_version_number)
        assert current.body == newest[row.external_id].solution
    assert SolutionVersion.objects.filter(problem__dataset=dataset).count() == 8 + count


@pytest.mark.django_db
def test_a_reload_keeps_waypoints_an_expert_changed_on_an_unchanged_solution():
    load("--per-family", "1", "--families", "add3", "--dataset", "gen")
    problem = Problem.objects.get(dataset__name="gen")
    version = problem.versions.get()
    version.waypoints.all().delete()
    Waypoint.objects.create(version=version, start=0, end=3, order=0, origin="expert")
    output = load("--per-family", "1", "--families", "add3", "--dataset", "gen")
    assert output.endswith("0 new, 0 updated, 1 unchanged.")
    assert [(w.start, w.end) for w in problem.versions.get().waypoints.all()] == [(0, 3)]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--per-family", "0"], "problems per family must be 1..9999; got 0"),
        (["--families", "add3,cubes"], "unknown family 'cubes'; choose from"),
        (["--families", ""], "choose at least one family"),
        (["--dataset", "  "], "A dataset needs a name."),
        (["--seed", "-3"], "the seed must be a whole number >= 0; got -3"),
    ],
)
def test_bad_command_arguments_give_clear_errors(args, message):
    with pytest.raises(CommandError, match=message):
        load(*args)
    assert not Problem.objects.exists()


@pytest.mark.django_db
def test_argument_parsing_refuses_what_is_not_a_whole_number():
    with pytest.raises(CommandError, match="'3.5' is not a whole number"):
        load("--per-family", "3.5")


@pytest.mark.django_db
def test_a_proof_dataset_is_refused():
    make_dataset(name="proofs", kind="proof")
    with pytest.raises(CommandError, match="The dataset 'proofs' holds proofs"):
        load("--dataset", "proofs", "--per-family", "1")
    assert not Problem.objects.exists()
