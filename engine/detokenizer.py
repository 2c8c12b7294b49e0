"""Incremental detokenization: generated token ids -> text deltas, O(1) work per token.

Design (the prefix/read-offset window of HF TGI and vLLM): keep two offsets into
prompt + output ids. `read_offset` is where the text already emitted ends; `prefix_offset`
starts a few tokens earlier. Each push decodes only the window [prefix_offset:] and the
prefix [prefix_offset:read_offset], and emits the new window's text past the prefix's.
The prefix supplies the context a token's text depends on: SentencePiece (Metaspace) and
WordPiece decoders drop the leading space of the FIRST token they decode, so a window that
starts at the new token would turn "▁world" into "world"; with one earlier token in front the
space survives. The first window starts inside the prompt for the same reason. Special
tokens that decode() skips are dropped on arrival (decoding without them gives the same
text), so a window never holds only invisible tokens, which would void that context.

Text is held back (nothing emitted, offsets unchanged, the window grows) while it may still
change:
- the window's text ends in U+FFFD: an incomplete UTF-8 character, a multi-byte character
  split over byte tokens (ByteLevel BPE, byte fallback);
- the newest decoded token is a SentencePiece byte-fallback piece `<0xNN>`: HF's ByteFallback
  decoder turns a whole run of byte pieces into one U+FFFD per byte as soon as any byte of
  the run is invalid, so even a valid run is final only once a non-byte token closes it.
`flush()` emits whatever is held once the request ends. A held window is bounded by the few
tokens of one character, except for a model that emits invalid bytes forever; past
MAX_HELD_TOKENS the text is emitted as it decodes then, so such a stream keeps flowing at
O(1) per token (and may differ from the reference only in how that garbage reads).

Invariant (the reference): with
    full   = tokenizer.decode(prompt + output, skip_special_tokens=s,
                              clean_up_tokenization_spaces=False,
                              spaces_between_special_tokens=b)
    prefix = tokenizer.decode(prompt, <same settings>)
the concatenation of every delta, flush() included, equals full[n:], where n is the length
of the longest common prefix of full and prefix. Normally prefix is a prefix of full and this
is plain full[len(prefix):], the output's text as it reads after the prompt (so the first
generated word keeps its leading space). When the prompt itself ends inside a character,
prefix ends in U+FFFD where full has the completed character; the output's text then starts
with that character rather than losing it or cutting into the next word, which is what
slicing by length alone would do. `spaces_between_special_tokens` is passed through to
decode (transformers 5's fast tokenizers accept and ignore it).
"""

from __future__ import annotations

import re
from typing import Any

# Tokens of prompt context in the first window: one suffices for leading-space rules; a few
# more let the window begin on a character boundary after byte tokens.
INITIAL_PREFIX_TOKENS = 5
MAX_HELD_TOKENS = 32
_INCOMPLETE = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDetokenizer:
    """One request's detokenizer: push new token ids, get the new text."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._backend_decode = backend_decode(tokenizer)
        # Candidates for skipping; each is confirmed by decoding it once (see _visible).
        self._special = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        self._skips: dict[int, bool] = {}
        self._output_ids: list[int] = []
        # The decode windows' ids: the visible tail of the prompt, then the visible output.
        # Windows never reach further back than this tail.
        tail = [t for t in prompt_token_ids[-(INITIAL_PREFIX_TOKENS + MAX_HELD_TOKENS) * 2 :]
                if self._visible(t)]
        self._ids: list[int] = tail[-(INITIAL_PREFIX_TOKENS + MAX_HELD_TOKENS) :]
        self._read_offset = len(self._ids)
        # The first window must not start inside a run of byte pieces: the run decodes as a
        # whole, so its tail alone can read differently.
        start = max(0, self._read_offset - INITIAL_PREFIX_TOKENS)
        while start > 0 and self._is_byte_piece(start) and self._is_byte_piece(start - 1):
            start -= 1
        self._prefix_offset = start
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._output_text = ""

    @property
    def output_text(self) -> str:
        """Everything emitted so far (the concatenation of the deltas)."""
        return self._output_text

    @property
    def output_token_ids(self) -> list[int]:
        """Every id pushed, skipped special tokens included."""
        return self._output_ids

    def push(self, token_ids: list[int]) -> str:
        """Append generated ids; return the text they complete ("" while it is held back)."""
        self._output_ids.extend(token_ids)
        self._ids.extend(t for t in token_ids if self._visible(t))
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit what is held back (an incomplete trailing character decodes as U+FFFD, as in
        the reference). Call once the request finishes."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        text = self._decode(self._prefix_offset, len(self._ids))
        held = len(self._ids) - self._read_offset
        if not final and held <= MAX_HELD_TOKENS and (
            text.endswith(_INCOMPLETE) or self._is_byte_piece(len(self._ids) - 1)
        ):
            return ""
        # The new text extends the prefix's, except where the prompt ended inside a character:
        # there the prefix's U+FFFD becomes that character, which is emitted too.
        delta = text[_common_prefix_len(self._prefix_text, text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._output_text += delta
        return delta

    def _visible(self, token_id: int) -> bool:
        """False for the special tokens decode() skips: a special token's own text is never
        empty, so decoding to "" proves it is skipped (checked once per id)."""
        if token_id not in self._special:
            return True
        if token_id not in self._skips:
            self._skips[token_id] = self._decode_ids([token_id]) == ""
        return not self._skips[token_id]

    def _is_byte_piece(self, i: int) -> bool:
        piece = self.tokenizer.convert_ids_to_tokens(self._ids[i])
        return isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._ids[start:end]) if start < end else ""

    def _decode_ids(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )


def backend_decode(tokenizer: Any) -> Any:
    """The Rust tokenizer's own decode when it is exactly what `tokenizer.decode` does with
    our arguments, else None.

    Why: decode runs two or three times per generated token of a streamed request, and
    transformers' Python wrapper (argument normalization, `to_py_obj` over the ids) costs
    several times the Rust decode itself. With clean_up_tokenization_spaces=False, the fast
    tokenizer's decode is `self._tokenizer.decode(ids, skip_special_tokens=...)` and nothing
    else (spaces_between_special_tokens is accepted and ignored), as long as the class
    overrides neither `decode` nor `_decode` (a few model tokenizers post-process there).
    """
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep the public decode
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, TokenizersBackend) and backend is not None
            and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode):
        return backend.decode
    return None


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that decode() might skip: named special tokens and added tokens marked special
    (fast tokenizers skip by the latter, Python ones by the former)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(added, dict):
        ids.update(i for i, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
