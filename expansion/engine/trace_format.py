"""A compact binary form of one expanded trace and its per-token data (no row per token).

`TraceArrays` holds, per token: id, character span in the decoded text, source view
(learner / privileged), draws, `log p_L`, `log p_PS`, `log p_NR`, and the top-N alternatives
(ids + log-probs) of PS and NR; plus the decoded text itself. `encode_trace` packs it into
bytes, `decode_trace` unpacks it.

Layout (little-endian): a 20-byte header
`b"DAILTR" | version u8 | flags u8 | tokens u32 | top_n u16 | text bytes u32 | reserved u16`,
then (zlib-compressed when flag 2 is set) the arrays in this order:
token ids (u16, or u32 when flag 1 is set: vocabularies over 65,535), character lengths (u16:
spans are contiguous, so lengths give the offsets), source bit 7 + draws bits 0-6 (u8), the
three log-probs (f16 each), PS top ids, PS top log-probs (f16), NR top ids, NR top log-probs
(f16), then the text as UTF-8.

Bytes per token before compression, plus the text (about 4 bytes per token for English/LaTeX):
- 16-bit ids (SmolLM2, 49,152 ids), top-5: 2 + 2 + 1 + 6 + 2 * 5 * (2 + 2) = 51 B;
- 32-bit ids (Qwen, 151,936 ids), top-5: 4 + 2 + 1 + 6 + 2 * 5 * (4 + 2) = 73 B.
The product's scale, 1,000 problems x 32 samples x 2,048 tokens = 65.5 M tokens, is therefore
at most 65.5 M x (73 + 4) B = 5.0 GB uncompressed (3.6 GB with 16-bit ids); zlib (level 6)
saves about a fifth more on model output (0.80 of the bytes on the embedded model's traces,
checked by a slow test), so about 3-4 GB on disk in blobs of ~100-150 kB per 2,048-token
trace, which decode in about a millisecond. float16 keeps log-probs to 3 significant digits (|error| < 0.008 nats at -20),
plenty for display and shortcut scores; the training objective recomputes exact values.

`char_offsets` decodes token ids incrementally (as vLLM's detokenizer does) so that every
token gets the characters it completes; a token that ends inside a multi-byte character gets
an empty span and the next one gets the character.

This module knows nothing about models or rollout rules; only `char_offsets` uses a tokenizer.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"DAILTR"
VERSION = 1
HEADER = struct.Struct("<6sBBIHIH")
FLAG_WIDE_IDS = 1
FLAG_COMPRESSED = 2
SOURCE_BIT = 0x80


class TraceFormatError(ValueError):
    """Bytes that are not a trace of this format, or arrays that cannot be packed."""


@dataclass
class TraceArrays:
    """One trace's per-token data (T tokens, N alternatives)."""

    text: str
    token_ids: np.ndarray  # (T,) int64
    char_lengths: np.ndarray  # (T,) int64; token i covers text[starts[i]:starts[i] + len[i]]
    sources: np.ndarray  # (T,) int8: 0 learner, 1 privileged
    draws: np.ndarray  # (T,) int8
    learner_logprobs: np.ndarray  # (T,) float32
    privileged_logprobs: np.ndarray  # (T,) float32
    negative_logprobs: np.ndarray  # (T,) float32
    privileged_top_ids: np.ndarray  # (T, N) int64
    privileged_top_logprobs: np.ndarray  # (T, N) float32
    negative_top_ids: np.ndarray  # (T, N) int64
    negative_top_logprobs: np.ndarray  # (T, N) float32

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def char_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.char_lengths)[:-1]]).astype(np.int64)

    @property
    def char_ends(self) -> np.ndarray:
        return np.cumsum(self.char_lengths).astype(np.int64)

    def token_text(self, index: int) -> str:
        start = int(self.char_starts[index])
        return self.text[start : start + int(self.char_lengths[index])]


def encode_trace(trace: TraceArrays, compress: bool = True) -> bytes:
    """Pack a trace into bytes (see the module docstring for the layout)."""
    tokens = len(trace)
    top_n = int(trace.privileged_top_ids.shape[1]) if trace.privileged_top_ids.ndim == 2 else 0
    _check_shapes(trace, tokens, top_n)
    max_id = max(
        [
            int(a.max())
            for a in (trace.token_ids, trace.privileged_top_ids, trace.negative_top_ids)
            if a.size
        ]
        or [0]
    )
    wide = max_id > 0xFFFF
    id_type = np.dtype("<u4") if wide else np.dtype("<u2")
    if trace.char_lengths.size and int(trace.char_lengths.max()) > 0xFFFF:
        raise TraceFormatError("a token spans more than 65,535 characters")
    if trace.draws.size and (int(trace.draws.max()) > 0x7F or int(trace.draws.min()) < 0):
        raise TraceFormatError("draws must be in [0, 127]")
    packed = (trace.draws.astype(np.uint8) & 0x7F) | np.where(
        trace.sources > 0, SOURCE_BIT, 0
    ).astype(np.uint8)
    text = trace.text.encode("utf-8")
    parts = [
        trace.token_ids.astype(id_type),
        trace.char_lengths.astype("<u2"),
        packed,
        np.stack(
            [trace.learner_logprobs, trace.privileged_logprobs, trace.negative_logprobs]
        ).astype("<f2"),
        trace.privileged_top_ids.astype(id_type),
        trace.privileged_top_logprobs.astype("<f2"),
        trace.negative_top_ids.astype(id_type),
        trace.negative_top_logprobs.astype("<f2"),
    ]
    payload = b"".join(np.ascontiguousarray(p).tobytes() for p in parts) + text
    flags = (FLAG_WIDE_IDS if wide else 0) | (FLAG_COMPRESSED if compress else 0)
    if compress:
        payload = zlib.compress(payload, 6)
    return HEADER.pack(MAGIC, VERSION, flags, tokens, top_n, len(text), 0) + payload


def decode_trace(blob: bytes) -> TraceArrays:
    """Unpack bytes made by `encode_trace`."""
    if len(blob) < HEADER.size:
        raise TraceFormatError("too short to be a trace")
    magic, version, flags, tokens, top_n, text_bytes, _ = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise TraceFormatError(f"not a DAIL trace (magic {magic!r})")
    if version != VERSION:
        raise TraceFormatError(f"unsupported trace format version {version}")
    payload = blob[HEADER.size :]
    if flags & FLAG_COMPRESSED:
        try:
            payload = zlib.decompress(payload)
        except zlib.error as exc:
            raise TraceFormatError(f"corrupt trace payload: {exc}") from exc
    id_type = np.dtype("<u4") if flags & FLAG_WIDE_IDS else np.dtype("<u2")
    offset = 0

    def take(dtype: Any, count: int, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal offset
        dtype = np.dtype(dtype)
        end = offset + dtype.itemsize * count
        if end > len(payload):
            raise TraceFormatError("truncated trace payload")
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset = end
        return array

    token_ids = take(id_type, tokens, (tokens,)).astype(np.int64)
    lengths = take("<u2", tokens, (tokens,)).astype(np.int64)
    packed = take("u1", tokens, (tokens,))
    logprobs = take("<f2", 3 * tokens, (3, tokens)).astype(np.float32)
    p_ids = take(id_type, tokens * top_n, (tokens, top_n)).astype(np.int64)
    p_lps = take("<f2", tokens * top_n, (tokens, top_n)).astype(np.float32)
    n_ids = take(id_type, tokens * top_n, (tokens, top_n)).astype(np.int64)
    n_lps = take("<f2", tokens * top_n, (tokens, top_n)).astype(np.float32)
    if offset + text_bytes != len(payload):
        raise TraceFormatError("trace payload has the wrong length")
    text = payload[offset:].decode("utf-8")
    return TraceArrays(
        text=text,
        token_ids=token_ids,
        char_lengths=lengths,
        sources=((packed & SOURCE_BIT) > 0).astype(np.int8),
        draws=(packed & 0x7F).astype(np.int8),
        learner_logprobs=logprobs[0],
        privileged_logprobs=logprobs[1],
        negative_logprobs=logprobs[2],
        privileged_top_ids=p_ids,
        privileged_top_logprobs=p_lps,
        negative_top_ids=n_ids,
        negative_top_logprobs=n_lps,
    )


def _check_shapes(trace: TraceArrays, tokens: int, top_n: int) -> None:
    per_token = (
        trace.char_lengths,
        trace.sources,
        trace.draws,
        trace.learner_logprobs,
        trace.privileged_logprobs,
        trace.negative_logprobs,
    )
    if any(a.shape != (tokens,) for a in per_token):
        raise TraceFormatError("per-token arrays must all have one entry per token")
    tops = (
        trace.privileged_top_ids,
        trace.privileged_top_logprobs,
        trace.negative_top_ids,
        trace.negative_top_logprobs,
    )
    if any(a.shape != (tokens, top_n) for a in tops):
        raise TraceFormatError("alternative arrays must all be (tokens, top_n)")
    if int(trace.char_lengths.sum()) != len(trace.text):
        raise TraceFormatError("character lengths do not add up to the text")


def char_offsets(tokenizer: Any, token_ids: Any) -> tuple[str, np.ndarray]:
    """(text, per-token character lengths) by incremental decoding; the text is the exact
    concatenation of the tokens' pieces (special tokens kept)."""
    ids = [int(t) for t in token_ids]

    def decode(piece: list[int]) -> str:
        return str(
            tokenizer.decode(piece, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )

    lengths = np.zeros(len(ids), dtype=np.int64)
    pieces: list[str] = []
    prefix = read = 0
    for index in range(len(ids)):
        before = decode(ids[prefix:read])
        after = decode(ids[prefix : index + 1])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            pieces.append(delta)
            lengths[index] = len(delta)
            prefix, read = read, index + 1
    if read < len(ids):  # trailing bytes of an unfinished character: give them to the last token
        delta = decode(ids[prefix:])[len(decode(ids[prefix:read])) :]
        pieces.append(delta)
        lengths[-1] += len(delta)
    return "".join(pieces), lengths
