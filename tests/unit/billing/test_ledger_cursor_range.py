"""A ledger cursor naming a time no datetime can hold is refused like any foreign cursor.

Found by the hostile-input scenario (tests/reliability): such a cursor matched the cursor
pattern and crashed the page read (HTTP 500) instead of answering 422 ``invalid_cursor``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.billing.domain import InvalidCursorError, LedgerCursor

ENTRY = "65a1b2c3d4e5f60718293a4b"


@pytest.mark.parametrize("at_ms", ["9999999999999999", "-9999999999999999", "-62135596800001"])
def test_a_cursor_time_outside_the_datetime_range_is_a_foreign_cursor(at_ms: str) -> None:
    with pytest.raises(InvalidCursorError, match="out of range"):
        LedgerCursor.decode(f"{at_ms}.{ENTRY}")


@pytest.mark.parametrize("at", [datetime(1970, 1, 1, tzinfo=UTC), datetime(2999, 1, 1, tzinfo=UTC)])
def test_a_cursor_time_inside_the_range_still_round_trips(at: datetime) -> None:
    cursor = LedgerCursor(int(at.timestamp() * 1000), ENTRY)
    assert LedgerCursor.decode(cursor.encode()) == cursor
    assert datetime.fromtimestamp(cursor.at_ms / 1000, UTC) == at
