"""SFT on expert solutions with the real embedded model (SmolLM2-135M-Instruct): a tiny run
(three short solutions, a few optimizer steps, launched and executed through the services)
lowers the NLL of the training solutions given the evaluation's learner prompt, measured with
the adapter on against the same model with the adapter off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dailweb.jobs import runner
from dailweb.jobs.models import Job, JobState
from tests.factories import make_dataset, make_problem, make_user
from tests.training.training_factories import small_config, tokenizer_for
from training.services import training as services
from training.services.expert_solutions import ExpertSolutionsChoice

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SOLUTIONS = (
    ("Compute 17 + 25.", "17 + 25 = 42.", "42"),
    ("Compute 9 times 7.", "9 * 7 = 63.", "63"),
    ("Compute 100 - 38.", "100 - 38 = 62.", "62"),
)


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A busy 2-core machine runs this much faster on one thread (threads of a shared pool
    spin-wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mean_response_nll(model, examples) -> float:
    """Mean over the examples of the per-token NLL of the response given the learner prompt."""
    values = []
    with torch.no_grad():
        for example in examples:
            prompt, response = example.learner_prompt_ids, example.response_ids
            ids = torch.tensor([[*prompt, *response]])  # (1, L)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (T, V)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(response)  # (T,)
            values.append(-log_probs.gather(1, target[:, None]).mean().item())
    return sum(values) / len(values)


def test_sft_on_expert_solutions_lowers_their_nll_under_the_learner(
    embedded_model_dir, broker_url, clean_queues
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dataset = make_dataset()
    for statement, solution, answer in SOLUTIONS:
        make_problem(dataset=dataset, statement=statement, solution=solution, answer=answer)
    run = services.training_run_launch(
        settings=services.TrainingSettings(
            name="SFT smoke",
            base_model_path=str(embedded_model_dir),
            config=small_config(
                objective="nll",
                max_length=256,
                epochs=2,
                learning_rate=1e-3,
                lora_r=8,
                checkpoint_every=100,
            ),
            expert_solutions=ExpertSolutionsChoice(dataset_id=dataset.pk),
        ),
        launched_by=make_user("admin"),
    )
    assert (run.examples_used, run.total_steps) == (3, 6)
    job = Job.objects.get(pk=run.job_id)
    runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
    job.refresh_from_db()
    run.refresh_from_db()
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    assert not run.did_not_move

    records = services.read_snapshot(Path(run.snapshot_file), run.snapshot_sha256)
    tokenizer = tokenizer_for(embedded_model_dir)
    examples, _ = services.training_examples(records, tokenizer, None)
    assert tokenizer.decode(examples[0].response_ids).startswith("17 + 25 = 42.")
    base = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run.adapter_path).eval()
    with model.disable_adapter():
        before = mean_response_nll(model, examples)
    after = mean_response_nll(model, examples)
    assert after < before - 0.1, (before, after)
