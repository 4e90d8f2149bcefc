"""python -m t3.attention.viz: attended-token maps and the PNG."""

from __future__ import annotations

import pytest

from t3.attention import WindowPlan
from t3.attention.viz import attended, main


def test_attended_tokens_are_the_query_group():
    grid, plan, query = (6, 8, 12), WindowPlan(2, 4, 3), (4, 5, 7)
    local = attended(grid, plan, "local", query)
    dilated = attended(grid, plan, "dilated", query)
    assert int(local.sum()) == int(dilated.sum()) == 3 * 2 * 4  # window (3, 2, 4)
    assert local[3:6, 4:6, 4:8].all()  # the contiguous block holding (4, 5, 7)
    assert dilated[0, 1, 1] and dilated[2, 5, 10] and not dilated[1, 1, 1]  # equal modulo (2, 4, 3)


def test_cli_writes_png_for_a_schedule_and_rejects_bad_queries(tmp_path):
    out = main(["--grid", "21", "16", "24", "--schedule", "wan21_windows", "--out", str(tmp_path / "p.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="outside grid"):
        main(
            [
                "--grid",
                "4",
                "4",
                "4",
                "--plan",
                "1",
                "2",
                "2",
                "--query",
                "4",
                "0",
                "0",
                "--out",
                str(tmp_path / "q.png"),
            ]
        )
