"""The mixed-policy rollout on vLLM, one module per concept (this package re-exports nothing):

- `availability`: whether vLLM can run here (`vllm_unavailable_reason`), without importing it,
  and how a command-line process that ran an engine ends (`exit_after_engine`);
- `outputs`: vLLM's log-prob outputs as numpy arrays (`TopLogprobs`, `top_logprobs_from_flat`);
- `decisions`: the rule's distributions and decisions from top-N log-probs
  (`view_distributions`, `chosen_logprobs_from_top`, `PositionDecisions`, `decide_positions`,
  `single_view_decisions`);
- `engine`: the vLLM engine factory and checks (`create_engine`, `DRAFT_PROCESSOR`,
  `engine_eos_ids`, `adapter_rank`) and the LoRA registry (`LoraRegistry`);
- `backends`: the `RolloutBackend`s (`VllmBackend`, `VllmPerTokenBackend`, `VllmRolloutStats`);
- `waves`: the wave algorithm (`Wave`): block drafting and checking, single-view sampling at
  tau = 0 / 1, the release's per-token loop;
- `drafting`: the logits processor vLLM loads in its worker (`DraftGuessProcessor`), which
  makes `generate` emit the rule's keyed guess or given tokens.

Only `drafting` imports vLLM at the top (it runs inside vLLM's worker); the others import it
inside the functions that talk to an engine, so `availability`, `outputs` and `decisions` work
(and are tested, `tests/engine/test_vllm_arrays.py`) where vLLM is not installed.
"""
