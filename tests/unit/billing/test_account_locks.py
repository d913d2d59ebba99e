"""Per-account locks: one per account while in use, gone when nobody holds them."""

from __future__ import annotations

import gc

from services.billing.handlers import AccountLocks


async def test_one_lock_per_account_and_none_kept_after_use() -> None:
    locks = AccountLocks()
    first = locks("org-a")
    assert locks("org-a") is first
    assert locks("org-b") is not first
    async with first:
        assert locks("org-a").locked()
    del first
    gc.collect()
    assert len(locks._locks) == 0  # no growth with the number of accounts ever seen
