"""The binary trace format: round trips, sizes, errors, character offsets."""

from __future__ import annotations

import numpy as np
import pytest

from expansion.engine.trace_format import (
    HEADER,
    TraceArrays,
    TraceFormatError,
    char_offsets,
    decode_trace,
    encode_trace,
)


def random_trace(tokens: int, top_n: int, vocab: int, seed: int = 0) -> TraceArrays:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, size=tokens)
    text = "".join(rng.choice(list("abcé∑ {}\\^"), size=int(lengths.sum())))
    return TraceArrays(
        text=text,
        token_ids=rng.integers(0, vocab, size=tokens),
        char_lengths=lengths,
        sources=rng.integers(0, 2, size=tokens).astype(np.int8),
        draws=rng.integers(1, 6, size=tokens).astype(np.int8),
        learner_logprobs=-rng.exponential(2.0, size=tokens).astype(np.float32),
        privileged_logprobs=-rng.exponential(2.0, size=tokens).astype(np.float32),
        negative_logprobs=-rng.exponential(2.0, size=tokens).astype(np.float32),
        privileged_top_ids=rng.integers(0, vocab, size=(tokens, top_n)),
        privileged_top_logprobs=-rng.exponential(3.0, size=(tokens, top_n)).astype(np.float32),
        negative_top_ids=rng.integers(0, vocab, size=(tokens, top_n)),
        negative_top_logprobs=-rng.exponential(3.0, size=(tokens, top_n)).astype(np.float32),
    )


@pytest.mark.parametrize("vocab", [49152, 151936])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("top_n", [0, 5])
def test_round_trip(vocab: int, compress: bool, top_n: int):
    trace = random_trace(300, top_n, vocab)
    back = decode_trace(encode_trace(trace, compress=compress))
    assert back.text == trace.text
    for name in (
        "token_ids",
        "char_lengths",
        "sources",
        "draws",
        "privileged_top_ids",
        "negative_top_ids",
    ):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name), err_msg=name)
    for name in ("learner_logprobs", "negative_logprobs", "privileged_top_logprobs"):
        # float16: relative error below 2^-11.
        np.testing.assert_allclose(
            getattr(back, name), getattr(trace, name), rtol=1e-3, err_msg=name
        )
    assert back.token_text(3) == trace.token_text(3)
    assert back.char_ends[-1] == len(trace.text)


def test_special_values_survive():
    trace = random_trace(4, 2, 100)
    trace.negative_logprobs[:] = [-np.inf, 0.0, -1e-8, -60000.0]
    back = decode_trace(encode_trace(trace))
    assert back.negative_logprobs[0] == -np.inf and back.negative_logprobs[1] == 0.0
    assert abs(back.negative_logprobs[3] + 60000.0) < 40


def test_documented_bytes_per_token():
    for vocab, per_token in ((49152, 51), (151936, 73)):
        trace = random_trace(1000, 5, vocab)
        raw = len(encode_trace(trace, compress=False))
        assert raw == HEADER.size + per_token * 1000 + len(trace.text.encode()), vocab


def test_empty_trace():
    trace = random_trace(0, 5, 100)
    assert len(decode_trace(encode_trace(trace))) == 0


def test_bad_input_is_refused():
    trace = random_trace(10, 3, 100)
    blob = encode_trace(trace, compress=False)
    with pytest.raises(TraceFormatError, match="magic"):
        decode_trace(b"NOTATR" + blob[6:])
    with pytest.raises(TraceFormatError, match="truncated|length"):
        decode_trace(blob[:-30])
    with pytest.raises(TraceFormatError, match="corrupt"):
        decode_trace(encode_trace(trace)[:-5])
    with pytest.raises(TraceFormatError, match="too short"):
        decode_trace(b"DAIL")
    trace.char_lengths[0] += 1
    with pytest.raises(TraceFormatError, match="add up"):
        encode_trace(trace)
    broken = random_trace(10, 3, 100)
    broken.draws = broken.draws.astype(np.int16)
    broken.draws[0] = 200
    with pytest.raises(TraceFormatError, match="draws"):
        encode_trace(broken)


def test_char_offsets_follow_multibyte_characters(tiny_tokenizer):
    text = "x² = 4 ⇒ x ∈ {−2, 2} 🙂 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    decoded, lengths = char_offsets(tiny_tokenizer, ids)
    assert decoded == text
    assert lengths.sum() == len(text)
    assert (lengths == 0).sum() == len(ids) - len(text)  # continuation bytes wait
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pieces = [decoded[s : s + n] for s, n in zip(starts, lengths, strict=True)]
    assert "🙂" in pieces and "²" in pieces


def test_char_offsets_keep_special_tokens_and_flush_unfinished_characters(tiny_tokenizer):
    ids = tiny_tokenizer("a<think>b", add_special_tokens=False)["input_ids"]
    text, lengths = char_offsets(tiny_tokenizer, ids)
    assert text == "a<think>b" and list(lengths) == [1, 7, 1]
    broken = tiny_tokenizer("é", add_special_tokens=False)["input_ids"][:1]  # half a character
    text, lengths = char_offsets(tiny_tokenizer, broken)
    assert lengths.sum() == len(text) == 1
