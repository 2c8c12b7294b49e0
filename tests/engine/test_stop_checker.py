"""Stop checking: stop strings are found across token boundaries and cut, stop tokens and
EOS respect min_tokens and ignore_eos, limits finish with "length", and what a stream sends
early is never taken back by a later stop."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tritonforge.engine.detokenizer import IncrementalDetokenizer
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.engine.stop_checker import (
    StopResult,
    check,
    emittable_text,
    find_stop_string,
    holdback,
    process_token,
)

from tests.engine.test_detokenizer import get_tokenizer

EOS = 2
PLAIN = 100  # an id that is neither EOS nor a stop token


def generate(pieces: list[str], params: SamplingParams, ids: list[int] | None = None,
             max_model_len: int = 10_000, prompt_len: int = 3) -> tuple[StopResult, int]:
    """Feed one token per piece until check() finishes; returns the result and how many
    tokens were generated."""
    ids = ids or [PLAIN] * len(pieces)
    text, out = "", []
    result = StopResult(None, None, "")
    for piece, tid in zip(pieces, ids):
        out.append(tid)
        text += piece
        result = check(out, piece, text, params, {EOS}, prompt_len + len(out), max_model_len)
        if result.finish_reason is not None:
            return result, len(out)
        text = result.text
    return result, len(out)


def test_stop_string_spanning_two_tokens_is_found_and_cut():
    result, n = generate(["Hello wor", "ld!##", "#END", " more"], SamplingParams(stop=["###"]))
    assert result == StopResult("stop", "###", "Hello world!") and n == 3


def test_stop_string_spanning_many_one_char_tokens():
    result, _ = generate(list("abc<|stop|>def"), SamplingParams(stop=["<|stop|>"]))
    assert result == ("stop", "<|stop|>", "abc")


def test_stop_string_at_the_very_start():
    result, n = generate(["STOP", "x"], SamplingParams(stop=["STOP"]))
    assert result == ("stop", "STOP", "") and n == 1
    result, _ = generate(["ST", "OPx"], SamplingParams(stop=["STOP"]))
    assert result == ("stop", "STOP", "")


def test_include_stop_str_in_output_keeps_the_stop_and_cuts_after_it():
    params = SamplingParams(stop=["###"], include_stop_str_in_output=True)
    assert generate(["a#", "##b", "c"], params)[0] == ("stop", "###", "a###")


def test_overlapping_candidates_the_match_ending_first_wins():
    # Arriving at once or char by char, "bc" completes before "abcd".
    params = SamplingParams(stop=["abcd", "bc"])
    assert generate(["xabcd"], params)[0] == ("stop", "bc", "xa")
    assert generate(list("xabcd"), params)[0] == ("stop", "bc", "xa")
    # Same end: the earlier start wins, so no part of a stop string leaks.
    params = SamplingParams(stop=["bc", "abc"])
    assert generate(["xabc"], params)[0] == ("stop", "abc", "x")
    # Earliest end even when the list order says otherwise.
    params = SamplingParams(stop=["cd", "ab"])
    assert generate(["zabcd"], params)[0] == ("stop", "ab", "z")


def test_a_stop_string_inside_earlier_text_is_not_searched_again():
    # find_stop_string only looks at matches ending in the new characters.
    assert find_stop_string("ab##cd", 2, ["##"]) is None  # "##" ended before "cd" came
    assert find_stop_string("ab##cd", 3, ["##"]) == (2, "##")  # its last "#" is new
    assert find_stop_string("ab##cd", 4, ["##"]) == (2, "##")
    assert find_stop_string("ab#", 1, ["##"]) is None
    assert find_stop_string("anything", 0, ["an"]) is None


def test_stop_token_id_ends_with_its_id_and_drops_its_text():
    params = SamplingParams(stop_token_ids=[50])
    result, n = generate(["Hi", " there", "\n", "more"], params, ids=[10, 11, 50, 12])
    assert result == ("stop", 50, "Hi there") and n == 3
    params = SamplingParams(stop_token_ids=[50], include_stop_str_in_output=True)
    assert generate(["Hi", "\n"], params, ids=[10, 50])[0] == ("stop", 50, "Hi\n")


def test_eos_stops_unless_ignored():
    assert generate(["Hi", ""], SamplingParams(), ids=[10, EOS])[0] == ("stop", None, "Hi")
    assert generate(["Hi", "</s>"], SamplingParams(), ids=[10, EOS])[0] == ("stop", None, "Hi")
    result, n = generate(["Hi", "", "x"], SamplingParams(ignore_eos=True), ids=[10, EOS, 11])
    assert result.finish_reason is None and n == 3
    # EOS listed as a stop token too still reports as EOS (vLLM's stop_reason None) ...
    params = SamplingParams(stop_token_ids=[EOS])
    assert generate(["Hi", ""], params, ids=[10, EOS])[0] == ("stop", None, "Hi")
    # ... and ignore_eos does not silence an explicit stop token, even if it is EOS.
    params = SamplingParams(ignore_eos=True, stop_token_ids=[EOS])
    assert generate(["Hi", ""], params, ids=[10, EOS])[0] == ("stop", EOS, "Hi")


def test_min_tokens_holds_off_eos_stop_tokens_and_stop_strings():
    params = SamplingParams(min_tokens=3, stop_token_ids=[50], stop=["!"])
    result, n = generate(["a", "b", "c"], params, ids=[EOS, 50, EOS])
    assert result == ("stop", None, "ab") and n == 3
    result, n = generate(["!", "?", "!", "x"], params)
    assert result == ("stop", "!", "!?") and n == 3


def test_max_tokens_and_max_model_len_finish_with_length():
    result, n = generate(["a"] * 10, SamplingParams(max_tokens=4))
    assert result == ("length", None, "aaaa") and n == 4
    result, n = generate(["a"] * 10, SamplingParams(max_tokens=None), max_model_len=8)
    assert result == ("length", None, "aaaaa") and n == 5  # 3 prompt + 5 output = 8
    # A stop on the last allowed token is still a stop.
    assert generate(["a", "b!"], SamplingParams(max_tokens=2, stop=["!"]))[0] == (
        "stop", "!", "ab")
    assert generate(["a", ""], SamplingParams(max_tokens=2), ids=[10, EOS])[0] == (
        "stop", None, "a")


def test_holdback_is_longest_stop_minus_one():
    assert holdback(SamplingParams()) == 0
    assert holdback(SamplingParams(stop=["a", "four", "xy"])) == 3


def test_emittable_text_holds_only_what_could_start_a_stop():
    params = SamplingParams(stop=["###", "END"])
    assert emittable_text("Hello #", params, finished=False) == "Hello "
    assert emittable_text("Hello ##", params, finished=False) == "Hello "
    assert emittable_text("Hello E", params, finished=False) == "Hello "
    assert emittable_text("Hello #x", params, finished=False) == "Hello #x"
    assert emittable_text("Hello EN", params, finished=True) == "Hello EN"
    assert emittable_text("any", SamplingParams(), finished=False) == "any"


# --- properties over random texts, stops and token boundaries -------------------------------
_alphabet = st.sampled_from("ab#")
_texts = st.text(_alphabet, min_size=0, max_size=30)
_stops = st.lists(st.text(_alphabet, min_size=1, max_size=4), min_size=1, max_size=3)


@st.composite
def _chunked(draw):
    text = draw(_texts)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=10)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)]) if i < j]
    return text, pieces


@settings(max_examples=400, deadline=None)
@given(_chunked(), _stops, st.booleans())
def test_result_does_not_depend_on_token_boundaries(chunked, stops, include):
    text, pieces = chunked
    params = SamplingParams(stop=stops, include_stop_str_in_output=include, max_tokens=None)
    by_char = generate(list(text), params)[0]
    by_token = generate(pieces, params)[0]
    assert (by_token.finish_reason, by_token.stop_reason, by_token.text) == (
        by_char.finish_reason, by_char.stop_reason, by_char.text)
    # Brute-force oracle: the first end position where some stop completes; the longest
    # such stop (earliest start).
    ends = [(end, -len(s), s) for end in range(1, len(text) + 1) for s in stops
            if text[:end].endswith(s)]
    if not ends:
        assert by_char == (None, None, text)
    else:
        end, _, stop = min(ends)
        cut = end if include else end - len(stop)
        assert by_char == ("stop", stop, text[:cut])


@settings(max_examples=400, deadline=None)
@given(_chunked(), _stops)
def test_holdback_never_emits_text_that_a_later_stop_removes(chunked, stops):
    _, pieces = chunked
    params = SamplingParams(stop=stops, max_tokens=None)
    text, out, sent = "", [], ""
    for piece in pieces:
        out.append(PLAIN)
        text += piece
        result = check(out, piece, text, params, {EOS}, 3 + len(out), 10_000)
        text = result.text
        finished = result.finish_reason is not None
        now = emittable_text(text, params, finished)
        assert now.startswith(sent), (sent, now)  # a stream only ever appends
        assert len(text) - len(now) <= holdback(params)
        sent = now
        if finished:
            break
    assert text.startswith(sent)  # nothing sent was cut by a stop


# --- process_token: detokenizer and stop checks together, held-back text included ----------
def finish(tok, prompt_text: str, output: list[int], params: SamplingParams,
           max_model_len: int = 10_000) -> tuple[StopResult, int]:
    """Runs output through process_token the way the engine does; (result, tokens used)."""
    prompt = tok.encode(prompt_text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, params.skip_special_tokens)
    text, out = "", []
    for tid in output:
        out.append(tid)
        result = process_token(detok, text, out, params, {tok.eos_token_id},
                               len(prompt) + len(out), max_model_len)
        text = result.text
        if result.finish_reason is not None:
            return result, len(out)
    return result, len(out)


def _byte_pieces(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])


def test_text_held_back_before_eos_is_kept():
    # Byte-fallback pieces stay held until a normal token closes their run; EOS (skipped)
    # closes nothing, so without the flush "你好" would be lost.
    tok = get_tokenizer("llama_bpe")
    output = _byte_pieces(tok, "你好") + [tok.eos_token_id]
    assert finish(tok, "Say:", output, SamplingParams())[0] == ("stop", None, "你好")
    visible = SamplingParams(skip_special_tokens=False)
    assert finish(tok, "Say:", output, visible)[0] == ("stop", None, "你好")
    keep = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    assert finish(tok, "Say:", output, keep)[0] == ("stop", None, "你好</s>")


def test_a_byte_piece_stop_token_drops_only_its_own_byte():
    tok = get_tokenizer("llama_bpe")
    newline = _byte_pieces(tok, "\n")[0]
    output = _byte_pieces(tok, "你好") + [newline] + _byte_pieces(tok, "more")
    result, n = finish(tok, "Say:", output, SamplingParams(stop_token_ids=[newline]))
    assert result == ("stop", newline, "你好") and n == 7


def test_length_finish_flushes_the_tail_and_searches_it_for_stops():
    tok = get_tokenizer("llama_bpe")
    output = _byte_pieces(tok, "你好吗")
    result, _ = finish(tok, "Say:", output, SamplingParams(max_tokens=9))
    assert result == ("length", None, "你好吗")
    result, _ = finish(tok, "Say:", output, SamplingParams(max_tokens=9, stop=["好"]))
    assert result == ("stop", "好", "你")
    # The tail of an unfinished character reads as the full decode would read it.
    result, _ = finish(tok, "Say:", output[:7], SamplingParams(max_tokens=7))
    assert result == ("length", None, tok.decode(output[:7]))


def test_stop_string_in_text_released_by_a_stop_token_wins():
    tok = get_tokenizer("llama_bpe")
    output = _byte_pieces(tok, "你好") + [tok.eos_token_id]
    assert finish(tok, "Say:", output, SamplingParams(stop=["好"]))[0] == ("stop", "好", "你")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 699), min_size=1, max_size=30), st.integers(1, 30))
def test_length_finish_text_is_the_full_decode(output, max_tokens):
    tok = get_tokenizer("llama_bpe")
    output = [t for t in output if t != tok.eos_token_id]
    if not output:
        return
    params = SamplingParams(max_tokens=min(max_tokens, len(output)))
    result, n = finish(tok, "Say:", output, params)
    prompt = tok.encode("Say:", add_special_tokens=False)
    full = tok.decode(prompt + output[:n], skip_special_tokens=True)
    assert result.finish_reason == "length" and n == params.max_tokens
    assert result.text == full[len(tok.decode(prompt, skip_special_tokens=True)) :]
