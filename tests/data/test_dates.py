"""Tests for the date-normalisation data generator."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

import pytest

from lightning_lora.data.dates import (
    FORMATS,
    PROMPT_PREFIX,
    format_date,
    generate_splits,
    main,
    make_record,
    ordinal_suffix,
    ordinal_word,
    sample_dates,
)

CHECKED_IN = Path(__file__).resolve().parents[2] / "examples" / "data" / "dates"
SAMPLE = dt.date(2011, 6, 19)  # a Sunday


@pytest.mark.parametrize(
    ("day", "expected"),
    [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"),
     (22, "22nd"), (23, "23rd"), (30, "30th"), (31, "31st")],
)  # fmt: skip
def test_ordinal_suffix(day: int, expected: str) -> None:
    assert ordinal_suffix(day) == expected


@pytest.mark.parametrize(
    ("day", "expected"),
    [(1, "first"), (3, "third"), (12, "twelfth"), (19, "nineteenth"), (20, "twentieth"), (21, "twenty-first"),
     (30, "thirtieth"), (31, "thirty-first")],
)  # fmt: skip
def test_ordinal_word(day: int, expected: str) -> None:
    assert ordinal_word(day) == expected


def test_ordinal_word_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"day must be in 1\.\.31, got 32"):
        ordinal_word(32)


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("d_mon_y", "19 Jun 2011"),
        ("month_d_y", "June 19, 2011"),
        ("ordinal_of", "the 19th of June 2011"),
        ("word_ordinal", "the nineteenth of June, 2011"),
        ("weekday_long", "Sunday, 19 June 2011"),
        ("weekday_short", "Sun Jun 19 2011"),
        ("ymd_dots", "2011.06.19"),
        ("dmy_slash", "19/6/2011 (day/month/year)"),
        ("mdy_slash", "6/19/2011 (month/day/year)"),
        ("d_mon_yy", "19-Jun-11 (two-digit year in the 2000s)"),
    ],
)
def test_format_date(style: str, expected: str) -> None:
    assert format_date(SAMPLE, style) == expected


def test_make_record_has_the_documented_shape() -> None:
    record = make_record(dt.date(2021, 3, 3), "ordinal_of")
    assert record == {"prompt": PROMPT_PREFIX + "the 3rd of March 2021", "response": "2021-03-03"}


def test_numeric_forms_state_their_field_order() -> None:
    """"7/2/1999" alone is ambiguous; every slash or dotted day-first form must say which field is which."""
    for style in ("ymd_slash", "dmy_slash", "mdy_slash", "dmy_dots"):
        assert re.search(r"\((day|month|year)[/.](day|month|year)[/.](day|month|year)\)$", format_date(SAMPLE, style))


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown date style 'iso'; valid styles: d_mon_y, "):
        format_date(SAMPLE, "iso")


def test_two_digit_year_outside_2000s_is_refused() -> None:
    with pytest.raises(ValueError, match=r"two-digit year.*2000-2049; got '1999-02-07'"):
        format_date(dt.date(1999, 2, 7), "d_mon_yy")


def test_sample_dates_are_distinct_and_in_range() -> None:
    dates = sample_dates(500, random.Random(1))
    assert len(set(dates)) == 500
    assert all(1950 <= d.year <= 2049 for d in dates)


def test_splits_are_deterministic_sized_and_disjoint() -> None:
    train, val = generate_splits(400, 40, seed=0)
    assert (train, val) == generate_splits(400, 40, seed=0)
    assert (train, val) != generate_splits(400, 40, seed=1)
    assert len(train) == 400 and len(val) == 40
    assert not {r["response"] for r in train} & {r["response"] for r in val}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


def test_every_style_appears_in_training_and_answers_are_iso() -> None:
    train, val = generate_splits(400, 40, seed=0)
    for record in train + val:
        assert record["prompt"].startswith(PROMPT_PREFIX)
        assert dt.date.fromisoformat(record["response"]).isoformat() == record["response"]
    shown = [(dt.date.fromisoformat(r["response"]), r["prompt"][len(PROMPT_PREFIX) :]) for r in train]
    for style in FORMATS:
        assert any(_renders_as(date, style, text) for date, text in shown), style


def _renders_as(date: dt.date, style: str, text: str) -> bool:
    try:
        return format_date(date, style) == text
    except ValueError:  # a two-digit-year style and a date outside the 2000s
        return False


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sizes must be >= 0, got train_size=-1"):
        generate_splits(-1, 4)


def test_main_writes_the_checked_in_files(tmp_path: Path) -> None:
    main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "val.jsonl"):
        written = (tmp_path / name).read_text(encoding="utf-8")
        assert written == (CHECKED_IN / name).read_text(encoding="utf-8"), f"regenerate {CHECKED_IN / name}"
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"prompt", "response"}
