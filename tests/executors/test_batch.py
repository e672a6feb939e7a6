"""``skyray batch``: valid requests render through Ray Data; bad lines are reported in the index, not fatal."""

from __future__ import annotations

import json

import pytest

from skyray.cli import main
from skyray.output.encode import probe

pytestmark = pytest.mark.ray


def test_batch_with_valid_and_invalid_lines(ray_session, tmp_path, capsys):
    lines = [
        json.dumps({"prompt": "a fox in the snow", "frames": 9, "seed": 1}),
        "{not json",
        json.dumps({"prompt": "a boat", "frames": 10}),
        json.dumps({"prompt": "a harbor at night", "duration": 1.0, "seed": 2}),
        json.dumps({"prompt": "x", "frames": 9, "colour": "red"}),
    ]
    req = tmp_path / "prompts.jsonl"
    req.write_text("\n".join(lines) + "\n")
    out = tmp_path / "batch"
    code = main(["batch", str(req), "--out", str(out), "--resolution", "32x32", "--fps", "8",
                 "--defaults", json.dumps({"steps": 2, "base_num_frames": 17, "overlap_history": 5})])
    assert code == 0
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["status"] for r in rows] == ["done", "invalid", "invalid", "done", "invalid"]
    assert "prompts.jsonl:2" in rows[1]["error"]
    assert "frames" in rows[2]["error"] and "try 9 or 13" in rows[2]["error"]
    assert "colour" in rows[4]["error"]
    assert probe(rows[0]["output"]).frames == 9
    assert probe(rows[3]["output"]).frames == 9  # 1.0 s at 8 fps snapped to 4k+1
    assert "2/5 requests rendered" in capsys.readouterr().out
