"""The demo task: normalise free-form dates ("the 3rd of March 2021", "7/2/1999") to ISO ``YYYY-MM-DD``.

The generator is deterministic (``random.Random(seed)``, no global state) and every prompt is unambiguous:
numeric forms state their field order ("day/month/year") and two-digit years state their century. Train
and validation sets are drawn from disjoint calendar dates, so validation answers are never seen in training.

Run ``python -m lightning_lora.data.dates --out examples/data/dates`` to write ``train.jsonl`` and ``val.jsonl``.

Example:
    >>> import datetime
    >>> make_record(datetime.date(2021, 3, 3), "ordinal_of")
    {'prompt': 'Convert this date to ISO format (YYYY-MM-DD): the 3rd of March 2021', 'response': '2021-03-03'}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PROMPT_PREFIX = "Convert this date to ISO format (YYYY-MM-DD): "
FIRST_YEAR, LAST_YEAR = 1950, 2049
# Two-digit years are only used for dates in the 2000s, and the prompt says so.
TWO_DIGIT_FIRST_YEAR, TWO_DIGIT_LAST_YEAR = 2000, 2049

MONTHS = ("January", "February", "March", "April", "May", "June",
          "July", "August", "September", "October", "November", "December")  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_UNITS = ("", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
_TEENS = ("tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
          "sixteenth", "seventeenth", "eighteenth", "nineteenth")  # fmt: skip


def ordinal_suffix(day: int) -> str:
    """Return ``day`` with its English ordinal suffix: 1 -> "1st", 12 -> "12th", 23 -> "23rd"."""
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def ordinal_word(day: int) -> str:
    """Return a day of the month (1-31) as an ordinal word: 3 -> "third", 21 -> "twenty-first"."""
    if not 1 <= day <= 31:
        raise ValueError(f"day must be in 1..31, got {day!r}")
    if day < 10:
        return _UNITS[day]
    if day < 20:
        return _TEENS[day - 10]
    tens = {2: "twenty", 3: "thirty"}[day // 10]
    if day % 10 == 0:
        return tens[:-1] + "ieth"  # twenty -> twentieth, thirty -> thirtieth
    return f"{tens}-{_UNITS[day % 10]}"


def _mon(d: dt.date) -> str:
    return MONTHS[d.month - 1][:3]


def _month(d: dt.date) -> str:
    return MONTHS[d.month - 1]


# One entry per surface form; each maps a date to the text shown after PROMPT_PREFIX.
FORMATS: dict[str, Callable[[dt.date], str]] = {
    "d_mon_y": lambda d: f"{d.day} {_mon(d)} {d.year}",  # 19 Jun 2011
    "d_month_y": lambda d: f"{d.day} {_month(d)} {d.year}",  # 19 June 2011
    "month_d_y": lambda d: f"{_month(d)} {d.day}, {d.year}",  # June 19, 2011
    "mon_d_y": lambda d: f"{_mon(d)} {d.day}, {d.year}",  # Jun 19, 2011
    "ordinal_of": lambda d: f"the {ordinal_suffix(d.day)} of {_month(d)} {d.year}",  # the 19th of June 2011
    "month_ordinal": lambda d: f"{_month(d)} {ordinal_suffix(d.day)}, {d.year}",  # June 19th, 2011
    "word_ordinal": lambda d: f"the {ordinal_word(d.day)} of {_month(d)}, {d.year}",  # the nineteenth of June, 2011
    "weekday_long": lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {_month(d)} {d.year}",  # Sunday, 19 June 2011
    "weekday_short": lambda d: f"{WEEKDAYS[d.weekday()][:3]} {_mon(d)} {d.day} {d.year}",  # Sun Jun 19 2011
    "ymd_dots": lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",  # 2011.06.19
    "ymd_slash": lambda d: f"{d.year}/{d.month}/{d.day} (year/month/day)",  # 2011/6/19 (year/month/day)
    "dmy_slash": lambda d: f"{d.day}/{d.month}/{d.year} (day/month/year)",  # 19/6/2011 (day/month/year)
    "mdy_slash": lambda d: f"{d.month}/{d.day}/{d.year} (month/day/year)",  # 6/19/2011 (month/day/year)
    "dmy_dots": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)",  # 19.06.2011 (day.month.year)
    "d_mon_yy": lambda d: f"{d.day}-{_mon(d)}-{d.year % 100:02d} (two-digit year in the 2000s)",  # 19-Jun-11
}
TWO_DIGIT_YEAR_FORMATS = frozenset({"d_mon_yy"})


def format_date(date: dt.date, style: str) -> str:
    """Render ``date`` in one of the :data:`FORMATS` styles.

    Args:
        date: The date to render.
        style: A key of :data:`FORMATS`, e.g. ``"dmy_slash"``.

    Returns:
        The free-form text, including any convention note such as ``"(day/month/year)"``.

    Raises:
        ValueError: If ``style`` is unknown, or a two-digit-year style is asked for a year outside 2000-2049.
    """
    if style not in FORMATS:
        raise ValueError(f"unknown date style {style!r}; valid styles: {', '.join(FORMATS)}")
    if style in TWO_DIGIT_YEAR_FORMATS and not TWO_DIGIT_FIRST_YEAR <= date.year <= TWO_DIGIT_LAST_YEAR:
        raise ValueError(
            f"style {style!r} writes a two-digit year, which is only unambiguous for "
            f"{TWO_DIGIT_FIRST_YEAR}-{TWO_DIGIT_LAST_YEAR}; got {date.isoformat()!r}"
        )
    return FORMATS[style](date)


def make_record(date: dt.date, style: str) -> dict[str, str]:
    """Build one instruction record ``{"prompt": ..., "response": "YYYY-MM-DD"}`` for ``date`` in ``style``."""
    return {"prompt": PROMPT_PREFIX + format_date(date, style), "response": date.isoformat()}


def sample_dates(n: int, rng: random.Random) -> list[dt.date]:
    """Draw ``n`` distinct dates uniformly from 1950-01-01 .. 2049-12-31 using ``rng``."""
    first = dt.date(FIRST_YEAR, 1, 1).toordinal()
    last = dt.date(LAST_YEAR, 12, 31).toordinal()
    if n > last - first + 1:
        raise ValueError(f"cannot draw {n} distinct dates from {last - first + 1} days")
    return [dt.date.fromordinal(o) for o in rng.sample(range(first, last + 1), n)]


def _pick_style(date: dt.date, index: int, rng: random.Random) -> str:
    """Cycle through the styles so every split holds each one; fall back when the year does not fit."""
    styles = list(FORMATS)
    style = styles[index % len(styles)]
    if style in TWO_DIGIT_YEAR_FORMATS and not TWO_DIGIT_FIRST_YEAR <= date.year <= TWO_DIGIT_LAST_YEAR:
        style = rng.choice([s for s in styles if s not in TWO_DIGIT_YEAR_FORMATS])
    return style


def generate_splits(
    train_size: int = 400, val_size: int = 40, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Generate the train and validation sets of the date task.

    Args:
        train_size: Number of training records. Default: ``400``.
        val_size: Number of validation records. Default: ``40``.
        seed: Seed of the ``random.Random`` that draws dates and styles. Default: ``0``.

    Returns:
        ``(train, val)``, lists of ``{"prompt", "response"}`` dicts; the two never share a calendar date.

    Raises:
        ValueError: If a size is negative.
    """
    if train_size < 0 or val_size < 0:
        raise ValueError(f"sizes must be >= 0, got train_size={train_size!r}, val_size={val_size!r}")
    rng = random.Random(seed)
    dates = sample_dates(train_size + val_size, rng)
    records = [make_record(d, _pick_style(d, i, rng)) for i, d in enumerate(dates)]
    # Styles cycle with the index, so shuffle before splitting to keep both splits a mix of every style.
    rng.shuffle(records)
    return records[val_size:], records[:val_size]


def write_jsonl(records: Sequence[dict[str, str]], path: str | Path) -> Path:
    """Write ``records`` to ``path``, one JSON object a line (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: write ``train.jsonl`` and ``val.jsonl`` of the date task into ``--out``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_lora.data.dates",
        description="Generate the date-normalisation instruction data set (free-form date -> YYYY-MM-DD).",
    )
    parser.add_argument("--out", required=True, help="output directory for train.jsonl and val.jsonl")
    parser.add_argument("--train-size", type=int, default=400, help="training rows (default: 400)")
    parser.add_argument("--val-size", type=int, default=40, help="held-out validation rows (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train, val = generate_splits(args.train_size, args.val_size, args.seed)
    out = Path(args.out)
    for name, records in (("train.jsonl", train), ("val.jsonl", val)):
        log.info("wrote %d rows to %s", len(records), write_jsonl(records, out / name))


if __name__ == "__main__":
    main()
