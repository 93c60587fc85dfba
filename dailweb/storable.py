"""Text a model generated, made storable.

A model can emit any byte, NUL included (byte-fallback tokenizers decode token 0x00 to
U+0000), and PostgreSQL text columns refuse NUL ("text fields cannot contain NUL (0x00)
bytes"), which failed the whole job. Generated text is stored with each NUL replaced by
U+FFFD, the replacement character a decoder uses for bytes it cannot show; nothing else
changes. (Text a person uploads is refused instead, with the position of the NUL:
`curation.services.transfer.jsonl_read`.)
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def storable_text(text: str) -> str:
    """`text` with every NUL replaced by U+FFFD (same length)."""
    return text.replace("\x00", REPLACEMENT)
