"""When a request stops, and what text it may show while streaming.

Design: `check` runs once per generated token, after the detokenizer appended `new_text` to
the output text. In order:

  1. min_tokens: with fewer outputs than asked, nothing stops the request (the sampler bans
     EOS and stop_token_ids meanwhile; stop strings completed in that span never count);
  2. EOS (unless ignore_eos) -> "stop", stop_reason None;
  3. stop_token_ids -> "stop", stop_reason = the token id;
  4. stop strings -> "stop", stop_reason = the string;
  5. max_tokens or max_model_len reached -> "length".
A stop beats "length" when both happen on the same token: the model did finish.

Stop strings match as if the text arrived one character at a time, whatever the token
boundaries: the winner is the match that ENDS first (ties: the one starting first, so no
stop text leaks), searched in the new text plus a lookback of len(stop) - 1 characters.
Earlier text was searched on earlier calls, so a match there would already have stopped the
request. The text is cut before the match (after it with include_stop_str_in_output). A
stopping EOS or stop token's own text (a special token when not skipped) is cut likewise.

`process_token` is the per-token recipe the engine runs (detokenize, then check). It exists
because the detokenizer may hold text back (an unfinished character, an open run of
byte-fallback pieces) and a request's last token must release it: text held from EARLIER
tokens is flushed before a stopping EOS/stop token is pushed, so cutting that token's text
never cuts theirs, and a request that ends by length flushes its tail before the stop-string
search, so the full text is searched and returned.

Streaming: the last `holdback(params)` characters might be the start of a stop string that
the next token completes; `emittable_text` returns the part of the text that is safe to send
(everything once finished), so a client never sees text that a later stop removes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

from tritonforge.engine.detokenizer import IncrementalDetokenizer
from tritonforge.engine.sampling_params import SamplingParams


class StopResult(NamedTuple):
    finish_reason: str | None  # "stop", "length" or None (keep going)
    stop_reason: int | str | None  # the stop token id or stop string; None for EOS/length
    text: str  # the output text, cut at the stop where one applies


def check(
    output_token_ids: Sequence[int],
    new_text: str,
    output_text: str,
    params: SamplingParams,
    eos_token_ids: Collection[int],
    num_tokens: int,
    max_model_len: int,
) -> StopResult:
    """Decide whether the request stops after its newest token.

    output_token_ids: the generated ids, newest last. new_text: the delta that token added
    to the detokenized text; output_text: the whole output text, new_text included.
    num_tokens: prompt + output tokens, checked against max_model_len.
    """
    num_output = len(output_token_ids)
    if num_output and is_stop_token(output_token_ids[-1], num_output, params, eos_token_ids):
        last = output_token_ids[-1]
        # A stopping token's own text goes, like a stop string's.
        if not params.include_stop_str_in_output:
            output_text = output_text[: len(output_text) - len(new_text)]
        return StopResult("stop", _token_stop_reason(last, params, eos_token_ids), output_text)
    if num_output >= params.min_tokens:
        match = find_stop_string(output_text, len(new_text), params.stop)
        if match is not None:
            return _stop_string_result(output_text, match, params)
    if reaches_length(num_output, num_tokens, params, max_model_len):
        return StopResult("length", None, output_text)
    return StopResult(None, None, output_text)


def is_stop_token(
    token_id: int, num_output_tokens: int, params: SamplingParams, eos_token_ids: Collection[int]
) -> bool:
    """Whether the newest token (the num_output_tokens-th) ends the request by its id."""
    if num_output_tokens < params.min_tokens:
        return False
    return token_id in params.stop_token_ids or (
        not params.ignore_eos and token_id in eos_token_ids
    )


def reaches_length(
    num_output_tokens: int, num_tokens: int, params: SamplingParams, max_model_len: int
) -> bool:
    return (params.max_tokens is not None and num_output_tokens >= params.max_tokens) or (
        num_tokens >= max_model_len
    )


def process_token(
    detokenizer: IncrementalDetokenizer,
    output_text: str,
    output_token_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: Collection[int],
    num_tokens: int,
    max_model_len: int,
) -> StopResult:
    """Detokenize the newest token (the last of output_token_ids, not yet pushed) and decide
    whether the request stops. output_text: the text so far; the result carries the new
    full text (cut at a stop, tail flushed when finished).
    """
    token, num_output = output_token_ids[-1], len(output_token_ids)
    if not is_stop_token(token, num_output, params, eos_token_ids):
        delta = detokenizer.push([token])
        if reaches_length(num_output, num_tokens, params, max_model_len):
            delta += detokenizer.flush()
        return check(output_token_ids, delta, output_text + delta, params, eos_token_ids,
                     num_tokens, max_model_len)
    # The text held back from earlier tokens is theirs: release it, search it for stop
    # strings (they completed before this token), then add the stop token's own text.
    earlier = detokenizer.flush()
    output_text += earlier
    if earlier and num_output >= params.min_tokens:
        match = find_stop_string(output_text, len(earlier), params.stop)
        if match is not None:
            return _stop_string_result(output_text, match, params)
    token_text = detokenizer.push([token]) + detokenizer.flush()
    if params.include_stop_str_in_output:
        output_text += token_text
    return StopResult("stop", _token_stop_reason(token, params, eos_token_ids), output_text)


def _token_stop_reason(
    token_id: int, params: SamplingParams, eos_token_ids: Collection[int]
) -> int | None:
    """None for EOS (as vLLM reports it), else the stop token id."""
    return None if not params.ignore_eos and token_id in eos_token_ids else token_id


def _stop_string_result(text: str, match: tuple[int, str], params: SamplingParams) -> StopResult:
    start, stop = match
    return StopResult("stop", stop, text[: start + len(stop)
                                          if params.include_stop_str_in_output else start])


def find_stop_string(
    text: str, num_new_chars: int, stops: Sequence[str]
) -> tuple[int, str] | None:
    """(start, stop) of the match ending first among those that end in the last
    `num_new_chars` characters of `text`; ties go to the earlier start. None if no match."""
    if not num_new_chars or not stops:
        return None
    first_new = len(text) - num_new_chars
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        # The first occurrence at or after this start is the earliest-ending one of `stop`,
        # and it ends in the new text (end > first_new) by construction.
        start = text.find(stop, max(0, first_new - len(stop) + 1))
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def holdback(params: SamplingParams) -> int:
    """How many trailing characters may still become part of a stop string."""
    return max((len(s) for s in params.stop), default=1) - 1


def emittable_text(text: str, params: SamplingParams, finished: bool) -> str:
    """The prefix of `text` a stream may send now.

    Once finished, all of it (check() already cut any stop). Before that, the text up to the
    earliest position from which the rest is a prefix of some stop string: a tail is held
    exactly while the next tokens could complete it into a stop, never longer.
    """
    if finished or not params.stop:
        return text
    for start in range(max(0, len(text) - holdback(params)), len(text)):
        tail = text[start:]
        if any(stop.startswith(tail) for stop in params.stop):
            return text[:start]
    return text
