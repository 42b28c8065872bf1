"""A bounded run of the randomized soak (``test/soak.py``) on 2 and 4 ranks."""

from __future__ import annotations

import pytest

from soak import generate_cases, soak


@pytest.mark.parametrize(("world_size", "count"), [(2, 150), (4, 60)])
def test_soak(world_size, count):
    result = soak(world_size, generate_cases(count), pg_timeout_s=60)
    print(f"[soak] {result}")
    assert result["hangs"] == 0, result["errors"]
    assert result["mismatches"] == 0
