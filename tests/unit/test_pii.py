"""PII scrubbing: recognizers with checksums, numbered placeholders, restoring (also streamed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorfabric.split import (
    GazetteerNameDetector,
    PiiMapping,
    PiiScrubber,
    SplitConfigError,
    StreamRestorer,
    iban_valid,
    luhn_valid,
)

TEXT = (
    "Mail jane.doe@example.com or call +49 30 1234567 / (555) 123-4567. "
    "Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00 thanks. "
    "SSN 123-45-6789, NINO AB 12 34 56 C, from 192.168.1.20 and 2001:db8::1. "
    "Jane Doe again: jane.doe@example.com."
)
ORIGINALS = [
    "jane.doe@example.com", "+49 30 1234567", "(555) 123-4567", "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00", "123-45-6789", "AB 12 34 56 C", "192.168.1.20", "2001:db8::1",
    "Jane Doe",
]  # fmt: skip


def scrubber() -> PiiScrubber:
    return PiiScrubber(name_detector=GazetteerNameDetector(["Jane Doe"]))


def test_every_kind_is_replaced_and_restored() -> None:
    out, mapping = scrubber().scrub(TEXT)
    for original in ORIGINALS:
        assert original not in out
    assert out.count("<EMAIL_1>") == 2  # the same address keeps its placeholder
    for ph in ("<PHONE_1>", "<PHONE_2>", "<CARD_1>", "<IBAN_1>", "<SSN_1>", "<NINO_1>",
               "<IP_1>", "<IP_2>", "<PERSON_1>"):  # fmt: skip
        assert ph in out
    assert mapping.restore(out) == TEXT
    assert mapping.counts()["PHONE"] == 2


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # Luhn fails
        "iban DE89 3704 0044 0532 0130 01",  # mod-97 fails
        "ssn 000-12-3456 and 666-12-3456 and 123-00-4567",  # invalid SSA areas/groups
        "on 2024-01-15 at 10:30:00, order 1234567, total 1,000,000",  # dates, times, amounts
        "version 1.2.3.4000 and 256.1.1.1",  # not IPv4
        "the ratio a:b:c",  # not IPv6
    ],
)
def test_lookalikes_are_left_alone(text: str) -> None:
    out, mapping = PiiScrubber().scrub(text)
    assert out == text, mapping.by_placeholder


def test_checksums() -> None:
    assert luhn_valid("4539 1488 0343 6467") and not luhn_valid("4539 1488 0343 6468")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82 WEST 1234 5698 7654 33")


def test_iban_too_short_for_its_country_is_not_an_iban() -> None:
    out, _ = PiiScrubber().scrub("iban DE89 3704 0044 0532 013")
    assert "<IBAN_" not in out  # (its long digit run may still be taken for a phone number)


def test_iban_followed_by_capitals_is_cut_at_country_length() -> None:
    out, m = PiiScrubber().scrub("GB82WEST12345698765432 OK THANKS")
    assert out == "<IBAN_1> OK THANKS"
    assert m.by_placeholder["<IBAN_1>"] == "GB82WEST12345698765432"


def test_mapping_is_shared_across_messages_and_unknown_placeholders_stay() -> None:
    s, m = PiiScrubber(), PiiMapping()
    a, _ = s.scrub("from a@x.org", m)
    b, _ = s.scrub("to b@y.org and a@x.org", m)
    assert (a, b) == ("from <EMAIL_1>", "to <EMAIL_2> and <EMAIL_1>")
    assert m.restore("<EMAIL_2>, <EMAIL_9>, <PHONE_1>") == "b@y.org, <EMAIL_9>, <PHONE_1>"


def test_kind_filter_and_unknown_kind() -> None:
    out, _ = PiiScrubber(kinds=["email"]).scrub("a@x.org 123-45-6789")
    assert out == "<EMAIL_1> 123-45-6789"
    with pytest.raises(SplitConfigError, match="unknown PII kinds"):
        PiiScrubber(kinds=["EMAIL", "SHOE_SIZE"])


def test_name_detector_plugin_protocol() -> None:
    class Upper:
        def detect(self, text: str):  # type: ignore[no-untyped-def]
            i = text.find("ACME")
            return [(i, i + 4, "org")] if i >= 0 else []

    out, m = PiiScrubber(name_detector=Upper()).scrub("ACME pays a@x.org")
    assert out == "<ORG_1> pays <EMAIL_1>"


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_stream_restorer_handles_placeholders_split_across_chunks(cuts: list[int]) -> None:
    scrubbed, mapping = scrubber().scrub(TEXT)
    reply = "Sure <PERSON_1>, I wrote to <EMAIL_1> and <EMAIL_1>; card <CARD_1>. <X> a<b <EMAIL_7>"
    points = sorted({c % (len(reply) + 1) for c in cuts})
    chunks = [reply[i:j] for i, j in zip([0, *points], [*points, len(reply)])]
    r = StreamRestorer(mapping)
    streamed = "".join(r.feed(c) for c in chunks) + r.flush()
    assert streamed == mapping.restore(reply)
    assert "jane.doe@example.com" in streamed and "<EMAIL_7>" in streamed


def test_stream_restorer_emits_promptly() -> None:
    _, mapping = PiiScrubber().scrub("a@x.org")
    r = StreamRestorer(mapping)
    assert r.feed("Hello ") == "Hello "
    assert r.feed("<EMA") == ""  # could be a placeholder: held back
    assert r.feed("IL_1> ok") == "a@x.org ok"
    assert r.feed("x < y") == "x < y"  # a lone "<" followed by a space cannot be one
