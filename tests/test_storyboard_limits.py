"""Bounded input (issue 13): every hostile storyboard is refused with a clear error, in bounded time and memory,
on each path that reads one (files, text, dicts, batch lines, the CLI), and a normal film still loads."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest
from hostile_storyboards import (
    HOSTILE_TEXT,
    alias_bomb,
    deep_nesting,
    long_prompt,
    many_shots,
    merge_bomb,
    not_utf8,
)
from sample_film import FILM

from skyray.batch import parse_requests
from skyray.cli import main
from skyray.plan import compile_plan
from skyray.storyboard import InputLimits, StoryboardError, load_storyboard, parse_storyboard, storyboard_from_data

SHOT = {"id": "harbor", "frames": 9, "prompt": "a harbor at dawn"}
MAX_CPU_S = 1.0  # what the unbounded loader spent was unbounded (minutes, then out of memory)
MAX_PEAK_MB = 64


def refused(text: str, folder: Path = Path("."), limits: InputLimits | None = None) -> str:
    """The error ``text`` is refused with; asserts the refusal took bounded CPU time, and (a second time, as
    tracemalloc slows Python down several times) bounded memory."""
    t0 = time.process_time()
    with pytest.raises(StoryboardError) as info:
        parse_storyboard(text, folder, "film.yaml", limits=limits)
    cpu = time.process_time() - t0
    assert cpu < MAX_CPU_S, f"refusing took {cpu:.2f} s of CPU"
    tracemalloc.start()
    try:
        with pytest.raises(StoryboardError):
            parse_storyboard(text, folder, "film.yaml", limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_MB << 20, f"refusing peaked at {peak >> 20} MB"
    return str(info.value)


def test_alias_bomb_is_refused_while_composing() -> None:
    text = alias_bomb()
    assert text.count("*") <= 64  # under the alias-count limit Serve had: the count alone does not stop it
    err = refused(text)
    assert "film.yaml:" in err and "expands to more than 50000 YAML nodes" in err
    assert "alias" in err


def test_merge_key_bomb_is_refused_while_composing() -> None:
    text = merge_bomb()
    assert text.count("*") <= 64
    err = refused(text)
    assert "expands to more than 50000 YAML nodes" in err and "merge key" in err


def test_recursive_alias_is_refused() -> None:
    err = refused("title: loop\nshots: &s\n  - id: a\n    frames: 9\n    prompt: *s\n")
    assert "film.yaml:5:" in err and "recursive alias" in err


@pytest.mark.parametrize("levels", [13, 300, 100_000])
def test_deep_nesting_is_refused_with_its_line(levels: int) -> None:
    err = refused("title: deep\nshots:\n  - " + "[" * levels + "]" * levels + "\n")
    assert err.startswith("film.yaml:3:") and "nested too deeply: more than 12 levels" in err


def test_aliases_that_nest_deeper_than_the_limit_are_refused() -> None:
    # Each list is shallow as written, but an alias puts its target's whole depth where it stands.
    lines = ["title: deep", "d0: &d0 [x]"] + [f"d{i}: &d{i} [*d{i - 1}]" for i in range(1, 12)]
    err = refused("\n".join(lines) + "\nshots:\n  - id: a\n    frames: 9\n    prompt: *d11\n")
    assert "nested too deeply: its YAML aliases reach more than 12 levels" in err


def test_ten_thousand_shots_are_refused_at_the_first_one_over(tmp_path: Path) -> None:
    err = refused(many_shots())  # JSON
    assert "more than 2000 shots, over the limit of 2000" in err
    err = refused(HOSTILE_TEXT["10,000 shots yaml"](), limits=InputLimits(max_shots=64))
    assert err.startswith(f"film.yaml:{1 + 2 + 64 * 3}:")  # the line of the 65th shot
    assert "more than 64 shots" in err


def test_million_character_prompt_names_shot_field_and_line() -> None:
    err = refused(long_prompt())
    assert err.startswith("film.yaml:5: shot 'harbor' field 'prompt': 1000000 characters, over the limit of 4000")
    err = refused(long_prompt(101), limits=InputLimits(max_prompt_chars=100))
    assert "field 'prompt': 101 characters, over the limit of 100" in err
    text = "title: t\nshots:\n  - id: a\n    frames: 9\n    prompt: [short, " + "y" * 5000 + "]\n"
    assert "shot 'a' field 'prompt[1]': 5000 characters" in refused(text)


def test_non_utf8_file_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "film.yaml"
    path.write_bytes(not_utf8())
    with pytest.raises(StoryboardError, match=r"film.yaml:5: not UTF-8 text: byte 0xe9"):
        load_storyboard(path)


def test_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "film.yaml"
    path.write_text(FILM + "#" * 2000)
    with pytest.raises(StoryboardError, match="bytes, over the limit of 1000"):
        load_storyboard(path, InputLimits(max_bytes=1000))


def test_dicts_are_held_to_the_same_limits() -> None:
    # Serve and batch hand over parsed data: it may be huge, deep, shared many times over, or cyclic.
    with pytest.raises(StoryboardError, match="10000 shots, over the limit of 2000"):
        storyboard_from_data({"title": "t", "shots": [dict(SHOT, id=f"s{i}") for i in range(10_000)]}, ".")
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(StoryboardError, match=r"shot 'harbor' field 'prompt\[0\].*: nested too deeply: more than 12 levels"):
        storyboard_from_data({"title": "t", "shots": [dict(SHOT, prompt=deep)]}, ".")
    shared: list = ["lol"] * 40
    for _ in range(3):
        shared = [shared] * 40  # a dict can share like YAML aliases do: 40**4 values in 4 lists
    with pytest.raises(StoryboardError, match="holds more than 50000 values"):
        storyboard_from_data({"title": "t", "shots": [dict(SHOT, prompt=shared)]}, ".")
    cyclic: dict = dict(SHOT)
    cyclic["teacache"] = cyclic
    with pytest.raises(StoryboardError, match="nested too deeply: more than 12 levels"):
        storyboard_from_data({"title": "t", "shots": [cyclic]}, ".")
    with pytest.raises(StoryboardError, match="shot 'harbor' field 'prompt': 1000000 characters"):
        storyboard_from_data({"title": "t", "shots": [dict(SHOT, prompt="x" * 1_000_000)]}, ".")


def test_ordinary_aliases_and_merge_keys_still_work(folder: Path) -> None:
    # An anchor on the first shot, merged into the second (a storyboard has no free field to hold one).
    text = """\
title: shared settings
resolution: 64x64
shots:
  - &first {id: a, frames: 9, prompt: &p a harbor at dawn, steps: 2, guidance_scale: 3.0}
  - {<<: *first, id: b, prompt: *p, steps: 3}
"""
    sb = parse_storyboard(text, folder)
    assert [(s.id, s.prompt, s.steps, s.guidance_scale) for s in sb.shots] == [
        ("a", ["a harbor at dawn"], 2, 3.0),
        ("b", ["a harbor at dawn"], 3, 3.0),
    ]
    # Merges chained through every shot splice pairs, they do not nest: a chain of 12 stays 5 levels deep.
    shots = ["  - &s0 {id: s0, frames: 9, prompt: [dawn], steps: 2}"]
    shots += [f"  - &s{i} {{<<: *s{i - 1}, id: s{i}}}" for i in range(1, 13)]
    sb = parse_storyboard("title: chain\nresolution: 64x64\nshots:\n" + "\n".join(shots) + "\n", folder)
    assert [(s.id, s.prompt, s.steps) for s in sb.shots][-1] == ("s12", ["dawn"], 2)


def test_a_normal_film_loads_after_every_hostile_one(folder: Path) -> None:
    for make in HOSTILE_TEXT.values():
        with pytest.raises(StoryboardError):
            parse_storyboard(make(), folder)
    plan = compile_plan(parse_storyboard(FILM, folder))
    assert [s.id for s in plan.shots] == ["open", "follow", "portrait", "branch"]
    assert plan.warnings == ()


def test_limits_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="max_depth must be >= 1"):
        InputLimits(max_depth=0)


# ---------------------------------------------------------------------------------------------- truncation


def test_plan_warns_when_the_tiny_encoder_will_cut_a_prompt(folder: Path) -> None:
    base = "title: t\nresolution: 64x64\nshots:\n  - id: a\n    frames: 9\n    prompt: "
    plan = compile_plan(parse_storyboard(base + "word " * 200 + "\n", folder, "film.yaml"))  # 1000 characters
    assert plan.warnings == (
        "film.yaml:6: shot 'a' field 'prompt': the prompt is 1000 tokens; the text encoder reads the first 512 and "
        "drops the rest",
    )
    # 511 characters and the end-of-text token fit exactly; whitespace collapses before encoding.
    assert compile_plan(parse_storyboard(base + "'" + "x  " * 255 + "x'\n", folder)).warnings == ()


def test_plan_warns_from_an_estimate_for_other_models(folder: Path) -> None:
    text = "title: t\nmodel: some/hub-model\nshots:\n  - id: a\n    frames: 9\n    prompt: [short, " + "y" * 3000 + "]\n"
    sb = parse_storyboard(text, folder, "film.yaml")
    assert sb.warnings == (
        "film.yaml:6: shot 'a' field 'prompt[1]': the prompt is 3000 characters, probably over the text encoder's "
        "512 tokens (about 2048 characters of English): the rest would be dropped",
    )


# ----------------------------------------------------------------------------------------------- batch, CLI


def test_batch_lines_are_bounded_one_by_one(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "a harbor", "frames": 9})
    lines = [
        good.encode(),
        json.dumps({"prompt": "x" * 1_000_000, "frames": 9}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": "caf\xe9", "frames": 9}',
        json.dumps({"prompt": [[[[[[[[[[[["deep"]]]]]]]]]]]], "frames": 9}).encode(),
    ]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    valid, invalid = parse_requests(path, {"model": "tiny", "resolution": "64x64"})
    assert [v["line"] for v in valid] == [1]
    errors = {row["line"]: row["error"] for row in invalid}
    assert "shot 'shot' field 'prompt': 1000000 characters, over the limit of 4000" in errors[2]
    assert "requests.jsonl:3: nested too deeply: more than 12 levels" in errors[3]
    assert "requests.jsonl:4: not UTF-8 text" in errors[4]
    assert "nested too deeply: more than 12 levels" in errors[5]


HOSTILE_FILES = {
    **{name: make for name, make in HOSTILE_TEXT.items() if name not in ("deep json", "10,000 shots yaml")},
    "non-UTF-8 bytes": not_utf8,
    "moderate nesting": lambda: deep_nesting(300),
}


@pytest.mark.parametrize("command", ["plan", "render"])
@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_cli_gives_a_clear_error_and_exit_code_2(tmp_path: Path, capsys, name: str, command: str) -> None:
    body = HOSTILE_FILES[name]()
    path = tmp_path / "film.yaml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    args = [command, str(path)] + (["--out", str(tmp_path / "out")] if command == "render" else [])
    t0 = time.process_time()
    assert main(args) == 2
    assert time.process_time() - t0 < MAX_CPU_S
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:") and len(err) < 1000, err
    assert not (tmp_path / "out").exists()  # refused before anything was written
