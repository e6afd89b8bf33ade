"""Unit tests for the streaming JSONL validator: every rule, the exact line it is reported on, and
bounded memory whatever the file holds."""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from service.files.validation import SHOWN_ERRORS, FileReport, check_example, validate_jsonl

GOOD: dict[str, Any] = {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}
NO_EXAMPLES = "the file holds no examples (it is empty or only blank lines)"
NUL_RULE = "contains NUL bytes: this looks like binary data, not JSONL"


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def jsonl(*lines: bytes) -> bytes:
    return b"".join(raw + b"\n" for raw in lines)


def example(text: str) -> bytes:
    return line({"messages": [{"role": "user", "content": text}]})


def validate(
    data: bytes, *, chunk_size: int | None = None, max_line_bytes: int = 1024, max_lines: int = 100
) -> FileReport:
    size = chunk_size or max(len(data), 1)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return validate_jsonl(chunks, max_line_bytes=max_line_bytes, max_lines=max_lines)


def rule_for_second_line(obj: Any) -> list[tuple[int, str]]:
    """The errors of a file whose line 1 is good and line 2 is `obj`."""
    report = validate(jsonl(line(GOOD), line(obj)))
    assert report.examples == 1
    return report.errors


# Good files


def test_good_file_counts_its_examples_and_has_no_errors() -> None:
    report = validate(jsonl(example("a"), example("b"), example("c")))
    assert report.examples == 3
    assert report.lines == 3
    assert report.error_count == 0
    assert report.errors == []
    assert report.summary() == ""


def test_keys_beside_messages_are_free_for_graders() -> None:
    obj = {**GOOD, "answer": "4", "metadata": {"source": "gsm8k", "id": 7}, "weight": 0.5}
    report = validate(jsonl(line(obj)))
    assert (report.examples, report.errors) == (1, [])


def test_tools_list_is_allowed() -> None:
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    report = validate(jsonl(line({**GOOD, "tools": [tool]}), line({**GOOD, "tools": []})))
    assert (report.examples, report.errors) == (2, [])


def test_full_conversation_ending_with_user_is_allowed() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer with a number."},
        {"role": "user", "content": [{"type": "text", "text": "2 + 2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
        {"role": "user", "content": "So?"},
    ]
    assert check_example({"messages": messages}) is None


# Lines that are not JSON


def test_invalid_json_line_is_reported_with_its_line_number_and_column() -> None:
    report = validate(jsonl(example("1"), example("2"), b'{"messages": oops}', example("4"), example("5")))
    assert report.errors == [(3, "is not valid JSON: Expecting value at column 14")]
    assert report.examples == 4
    assert report.lines == 5


def test_non_utf8_line_is_reported_with_the_offset_of_the_bad_byte() -> None:
    latin1 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    offset = latin1.index(b"\xe9")
    report = validate(jsonl(example("ok"), latin1, example("ok too")))
    assert report.errors == [(2, f"is not valid UTF-8 (bad byte at offset {offset})")]
    assert report.examples == 2


def test_nul_bytes_are_reported_as_binary_data() -> None:
    report = validate(jsonl(example("ok"), example("a\x00b").replace(b"\\u0000", b"\x00"), b"\x00\x00\x00"))
    assert report.errors == [(2, NUL_RULE), (3, NUL_RULE)]
    assert report.examples == 1


def test_escaped_nul_inside_a_json_string_is_text_not_binary() -> None:
    report = validate(jsonl(example("a\x00b")))  # json.dumps writes the NUL as \u0000
    assert (report.examples, report.errors) == (1, [])


def test_binary_file_is_rejected_line_by_line() -> None:
    png_header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00"
    report = validate(png_header)
    assert report.errors == [
        (1, "is not valid UTF-8 (bad byte at offset 0)"),
        (2, "is not valid JSON: Expecting value at column 1"),
        (3, NUL_RULE),
    ]
    assert report.examples == 0


def test_random_bytes_yield_no_examples_and_an_error_for_every_non_blank_line() -> None:
    # Seeded rather than os.urandom so that a failure can be replayed.
    data = random.Random(20240601).randbytes(2048) + b"\x00"
    physical = data.split(b"\n")
    non_blank = [n for n, raw in enumerate(physical, 1) if raw.rstrip(b"\r").strip()]
    report = validate(data, max_line_bytes=len(data), max_lines=len(physical))
    assert report.examples == 0
    assert report.error_count == len(non_blank)
    assert [n for n, _ in report.errors] == non_blank[:SHOWN_ERRORS]
    for n, rule in report.errors:
        if b"\x00" in physical[n - 1]:
            assert rule == NUL_RULE


# Lines that are JSON but not an RFT example


def test_top_level_list_is_rejected_as_not_an_object() -> None:
    assert rule_for_second_line([GOOD]) == [(2, "must be a JSON object, got list")]


def test_top_level_string_is_rejected_as_not_an_object() -> None:
    assert rule_for_second_line("hello") == [(2, "must be a JSON object, got str")]


def test_missing_messages_is_rejected() -> None:
    assert rule_for_second_line({"prompt": "2 + 2?"}) == [(2, "missing required key 'messages'")]


def test_empty_messages_is_rejected() -> None:
    assert rule_for_second_line({"messages": []}) == [
        (2, "'messages' must be a non-empty list of {role, content} objects")
    ]


def test_messages_that_is_not_a_list_is_rejected() -> None:
    assert rule_for_second_line({"messages": "2 + 2?"}) == [
        (2, "'messages' must be a non-empty list of {role, content} objects")
    ]


def test_message_that_is_not_an_object_is_rejected_with_its_index() -> None:
    obj = {"messages": [{"role": "system", "content": "hi"}, "2 + 2?"]}
    assert rule_for_second_line(obj) == [(2, "messages[1] must be an object with 'role' and 'content'")]


def test_invalid_role_is_rejected_listing_the_accepted_roles() -> None:
    obj = {"messages": [{"role": "robot", "content": "hi"}]}
    assert rule_for_second_line(obj) == [
        (2, "messages[0].role is 'robot'; expected one of system, developer, user, assistant, tool")
    ]


def test_missing_role_is_rejected_listing_the_accepted_roles() -> None:
    obj = {"messages": [{"content": "hi"}]}
    assert rule_for_second_line(obj) == [
        (2, "messages[0].role is None; expected one of system, developer, user, assistant, tool")
    ]


@pytest.mark.parametrize("content", [42, True, {"text": "hi"}])
def test_content_of_wrong_type_is_rejected(content: Any) -> None:
    obj = {"messages": [{"role": "user", "content": content}]}
    assert rule_for_second_line(obj) == [(2, "messages[0].content must be a string or a list of content parts")]


def test_last_message_not_from_user_is_rejected() -> None:
    obj = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    assert rule_for_second_line(obj) == [
        (2, "the last message must have role 'user' (the model answers it), got 'assistant'")
    ]


def test_tools_that_is_not_a_list_is_rejected() -> None:
    obj = {**GOOD, "tools": {"name": "add"}}
    assert rule_for_second_line(obj) == [
        (2, 'tools must be a list of tool definitions, {"type": "function", "function": {...}} each')
    ]


# Line endings, blank lines and the BOM


def test_blank_lines_are_skipped_but_keep_their_line_numbers() -> None:
    report = validate(jsonl(example("1"), b"", b"   ", b"\t", example("5"), b"", b"[]", b"", example("9")))
    assert report.errors == [(7, "must be a JSON object, got list")]
    assert report.examples == 3
    assert report.lines == 4


def test_crlf_line_endings_are_accepted_and_numbered_like_lf() -> None:
    crlf = b"".join(raw + b"\r\n" for raw in [example("1"), b"", b'{"messages": oops}', example("4")])
    report = validate(crlf)
    assert report.errors == [(3, "is not valid JSON: Expecting value at column 14")]
    assert report.examples == 2


def test_utf8_bom_at_the_start_is_ignored() -> None:
    report = validate(b"\xef\xbb\xbf" + jsonl(example("1"), example("2")))
    assert (report.examples, report.errors) == (2, [])


def test_bom_after_the_first_line_is_reported() -> None:
    report = validate(jsonl(example("1"), b"\xef\xbb\xbf" + example("2")))
    assert report.errors == [(2, "is not valid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1")]


def test_last_line_without_trailing_newline_is_checked() -> None:
    report = validate(jsonl(example("1")) + b'{"messages": []}')
    assert report.errors == [(2, "'messages' must be a non-empty list of {role, content} objects")]
    assert report.lines == 2
    assert validate(jsonl(example("1")) + example("2")).examples == 2


# Whole-file rules


def test_empty_input_reports_that_the_file_holds_no_examples() -> None:
    report = validate_jsonl([], max_line_bytes=1024, max_lines=100)
    assert report.errors == [(1, NO_EXAMPLES)]
    assert report.error_count == 1
    assert validate_jsonl([b""], max_line_bytes=1024, max_lines=100) == report


def test_whitespace_only_input_reports_no_examples_on_its_last_line() -> None:
    report = validate(b"\n  \n\t\r\n   ")
    assert report.errors == [(4, NO_EXAMPLES)]
    assert report.error_count == 1
    assert report.lines == 0


def test_more_examples_than_max_lines_gives_one_error_naming_the_limit() -> None:
    report = validate(jsonl(*(example(str(i)) for i in range(6))), max_lines=3)
    assert report.errors == [(4, "the file has more than 3 examples, the limit for this file")]
    assert report.error_count == 1
    assert report.examples == 3


def test_exactly_max_lines_examples_is_accepted() -> None:
    report = validate(jsonl(b"", *(example(str(i)) for i in range(3)), b""), max_lines=3)
    assert (report.examples, report.errors) == (3, [])


def test_lines_past_the_limit_are_not_checked() -> None:
    report = validate(jsonl(example("1"), example("2"), b"[]", b"x" * 200, b"\x00"), max_lines=2, max_line_bytes=100)
    assert report.errors == [(3, "the file has more than 2 examples, the limit for this file")]
    assert report.error_count == 1


def test_too_long_line_just_past_the_limit_still_reports_the_limit() -> None:
    report = validate(jsonl(example("1"), example("2"), b"x" * 200, example("4")), max_lines=2, max_line_bytes=100)
    assert report.errors == [(3, "the file has more than 2 examples, the limit for this file")]
    assert report.error_count == 1


# Long lines and chunk boundaries


def test_line_longer_than_max_line_bytes_is_reported_and_later_lines_still_checked() -> None:
    report = validate(jsonl(example("1"), b"x" * 101, b"", b"[]", example("5")), max_line_bytes=100)
    assert report.errors == [(2, "is longer than 100 bytes"), (4, "must be a JSON object, got list")]
    assert report.examples == 2
    assert report.lines == 4


def test_line_of_exactly_max_line_bytes_is_accepted_with_lf_or_crlf() -> None:
    good = example("x" * 40)
    for ending in (b"\n", b"\r\n"):
        for data in (good + ending + good + ending, good + ending + good):
            report = validate(data, max_line_bytes=len(good))
            assert (report.examples, report.errors) == (2, []), data[-2:]
        too_long = validate(good + b"x" + ending, max_line_bytes=len(good))
        assert too_long.errors == [(1, f"is longer than {len(good)} bytes")]


def test_long_line_spanning_many_chunks_is_reported_once_and_numbering_continues() -> None:
    data = jsonl(example("1"), b"y" * 5000, b"[]", b"z" * 5000, example("5"))
    for chunk_size in (7, 100, 1000):
        report = validate(data, chunk_size=chunk_size, max_line_bytes=100)
        assert report.errors == [
            (2, "is longer than 100 bytes"),
            (3, "must be a JSON object, got list"),
            (4, "is longer than 100 bytes"),
        ], chunk_size
        assert report.examples == 2


def test_too_long_last_line_without_newline_is_reported() -> None:
    report = validate(jsonl(example("1")) + b"y" * 500, chunk_size=64, max_line_bytes=100)
    assert report.errors == [(2, "is longer than 100 bytes")]


MIXED = (
    b"\xef\xbb\xbf"
    + example("BOM and CRLF")
    + b"\r\n"  # 1
    + b"\n"  # 2 blank
    + b"  \t\r\n"  # 3 blank
    + b'{"messages": [{"role": "user", "content": "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"}]}\n'  # 4
    + b"x" * 300
    + b"\n"  # 5 too long
    + b'{"messages": [}\n'  # 6 bad JSON
    + b"\xff\xfe{}\n"  # 7 not UTF-8
    + b'{ "messages" : [ { "content" : "BOM and CRLF", "role" : "user" } ] }\n'  # 8 duplicate of 1
    + b"a\x00b\n"  # 9 NUL
    + b"y" * 121
    + b"\r\n"  # 10 too long by one byte
    + b"y" * 120
    + b"\r\n"  # 11 fits, bad JSON
    + example("no newline")  # 12
)


def test_mixed_file_reports_every_rule_at_its_physical_line() -> None:
    report = validate(MIXED, max_line_bytes=120)
    assert report.errors == [
        (5, "is longer than 120 bytes"),
        (6, "is not valid JSON: Expecting value at column 15"),
        (7, "is not valid UTF-8 (bad byte at offset 0)"),
        (9, NUL_RULE),
        (10, "is longer than 120 bytes"),
        (11, "is not valid JSON: Expecting value at column 1"),
    ]
    assert report.examples == 4
    assert report.lines == 10
    assert sorted(report.line_hashes.values()) == [1, 4, 12]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 121, 122])
def test_report_does_not_depend_on_chunk_boundaries(chunk_size: int) -> None:
    whole = validate(MIXED, max_line_bytes=120)
    assert validate(MIXED, chunk_size=chunk_size, max_line_bytes=120) == whole


def test_empty_chunks_in_the_stream_are_harmless() -> None:
    data = jsonl(example("1"), b"[]")
    chunks = [b"", data[:10], b"", b"", data[10:], b""]
    assert validate_jsonl(chunks, max_line_bytes=1024, max_lines=100) == validate(data)


@pytest.mark.timeout(60)
def test_gigabyte_line_without_newline_is_reported_in_bounded_memory() -> None:
    mib, max_line_bytes = 1 << 20, 8 << 20  # the service's default max_line_bytes
    yielded = 0

    def stream() -> Iterator[bytes]:
        nonlocal yielded
        for _ in range(1024):
            yielded += 1
            yield b"x" * mib  # a fresh chunk each time, as a file read gives: 1 GiB in all, never held at once

    tracemalloc.start()
    try:
        started = time.perf_counter()
        report = validate_jsonl(stream(), max_line_bytes=max_line_bytes, max_lines=100)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert yielded == 1024
    assert report.errors == [(1, f"is longer than {max_line_bytes} bytes")]
    assert (report.lines, report.examples, report.error_count) == (1, 0, 1)
    assert peak < 32 * mib, f"peak {peak / mib:.1f} MiB"
    assert elapsed < 20, f"took {elapsed:.1f} s"


# Errors kept and the summary


def test_only_the_first_errors_are_kept_but_all_are_counted() -> None:
    report = validate(jsonl(example("ok"), *([b"[]"] * 15)))
    assert report.error_count == 15
    assert report.errors == [(n, "must be a JSON object, got list") for n in range(2, 2 + SHOWN_ERRORS)]
    assert report.summary().endswith("; and 5 more")
    assert report.summary().startswith("line 2: must be a JSON object, got list; line 3: ")


def test_summary_lists_each_error_with_its_line_and_no_tail_when_all_are_shown() -> None:
    report = validate(jsonl(b"[]", example("ok"), b'{"messages": []}'))
    assert report.summary() == (
        "line 1: must be a JSON object, got list; "
        "line 3: 'messages' must be a non-empty list of {role, content} objects"
    )


# Line digests, used to find validation examples that also appear in training


def test_identical_examples_share_a_digest_and_keep_their_first_line() -> None:
    obj = {"messages": [{"role": "user", "content": "café"}], "answer": "4"}
    same = b'{ "answer":"4",\t"messages" : [ {"content": "caf\\u00e9", "role": "user"} ] }'
    report = validate(jsonl(example("other"), line(obj), b"", same, b"[]", json.dumps(obj, indent=None).encode()))
    assert report.examples == 4
    assert sorted(report.line_hashes.values()) == [1, 2]


def test_same_example_in_two_files_has_the_same_digest() -> None:
    train = validate(jsonl(example("a"), example("b")))
    valid = validate(jsonl(b"", b'{"messages":[{"content":"b","role":"user"}]}'))
    shared = {digest: n for digest, n in valid.line_hashes.items() if digest in train.line_hashes}
    assert list(shared.values()) == [2]


def test_different_examples_have_different_digests() -> None:
    report = validate(jsonl(example("a"), example("b"), line({**GOOD, "answer": "4"}), line({**GOOD, "answer": 4})))
    assert len(report.line_hashes) == 4


def test_invalid_lines_have_no_digest() -> None:
    report = validate(jsonl(example("a"), b"[]", b'{"messages": []}'))
    assert list(report.line_hashes.values()) == [1]
