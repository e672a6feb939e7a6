"""Storyboard loading: a valid film resolves as written; each class of mistake names its line, shot and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_film import FILM

from skyray.storyboard import (
    SAMPLING_FIELDS,
    Defaults,
    Shot,
    StoryboardError,
    load_storyboard,
    parse_resolution,
    parse_storyboard,
    snap_duration,
)


def load(folder: Path, text: str):
    path = folder / "film.yaml"
    path.write_text(text)
    return load_storyboard(path)


def error_of(folder: Path, text: str) -> str:
    with pytest.raises(StoryboardError) as info:
        load(folder, text)
    return str(info.value)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line containing ``needle`` (so the tests do not hard-code line numbers)."""
    return [n for n, line in enumerate(text.splitlines(), 1) if needle in line][nth - 1]


def edit(old: str, new: str, text: str = FILM) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def where(folder: Path, text: str, needle: str, nth: int = 1) -> str:
    return f"{folder / 'film.yaml'}:{line_of(text, needle, nth)}:"


# ------------------------------------------------------------------------------------------------------ valid


def test_valid_film_resolves_seeds_paths_frames_and_overrides(folder: Path) -> None:
    sb = load(folder, FILM)
    assert (sb.height, sb.width, sb.fps) == (64, 64, 8)
    assert [s.id for s in sb.shots] == ["open", "follow", "portrait", "branch"]
    assert [s.seed for s in sb.shots] == [7, 8, 100, 10]  # film seed + index unless set
    # duration snapping: 2.0 s x 8 fps = 16 -> nearest 4k+1 = 17 (fresh); 1.4 s -> 11.2 -> nearest 4k = 12
    assert [s.frame_count for s in sb.shots] == [25, 16, 17, 12]
    assert sb.shots[0].prompt == ["dawn", "noon"] and sb.shots[1].prompt == ["dusk"]
    assert sb.shots[2].image == str((folder / "still.png").resolve()) == sb.shots[2].end_image
    assert [sb.continued_index(i) for i in range(4)] == [None, 0, None, 0]
    assert sb.setting(1, "steps") == 2 and sb.setting(0, "steps") == 3
    assert sb.setting(3, "guidance_scale") == 1 and sb.setting(3, "ar_step") == 1 and sb.setting(2, "ar_step") == 0
    assert sb.setting(0, "shift") == 8.0 and sb.setting(0, "addnoise_condition") == 20  # built-in defaults
    assert sb.shots[2].transition.fade == 0.5
    assert sb.warnings == ()


def test_shot_overrides_every_default() -> None:
    overridable = set(Shot.model_fields) - {
        "id",
        "prompt",
        "original_prompt",
        "frames",
        "duration",
        "seed",
        "image",
        "end_image",
        "video",
        "continue_",
        "continue_from",
        "transition",
    }
    assert overridable == set(SAMPLING_FIELDS) == set(Defaults.model_fields)


def test_parse_posted_json_and_yaml_agree(folder: Path) -> None:
    import yaml

    from_yaml = parse_storyboard(FILM, folder, "film.yaml")
    posted = json.dumps(yaml.safe_load(FILM), indent="\t")  # tabs: valid JSON, not valid YAML indentation
    from_json = parse_storyboard(posted, folder, "post.json")
    assert from_json.canonical_json() == from_yaml.canonical_json()
    bad = edit('"frames": 25', '"frames": 26', posted)
    with pytest.raises(StoryboardError) as info:
        parse_storyboard(bad, folder, "post.json")
    assert str(info.value).startswith(f"post.json:{line_of(bad, '26')}: shot 'open' field 'frames': 26 frames")


def test_snapping_and_resolutions() -> None:
    assert [snap_duration(s, 24, fresh=True) for s in (0.01, 1.0, 4.0)] == [1, 25, 97]
    assert [snap_duration(s, 24, fresh=False) for s in (0.01, 1.0, 3.4)] == [4, 24, 80]
    assert snap_duration(0.01, 24, fresh=True, min_frames=5) == 5
    assert parse_resolution("540p") == (544, 960) and parse_resolution("720p") == (720, 1280)
    assert parse_resolution("960x544") == (544, 960)  # W x H


def test_high_addnoise_warns_at_its_line(folder: Path) -> None:
    text = edit("  guidance_scale: 5.0\n", "  guidance_scale: 5.0\n  addnoise_condition: 80\n")
    sb = load(folder, text)
    assert len(sb.warnings) == 1
    assert sb.warnings[0].startswith(f"{where(folder, text, 'addnoise_condition')} field 'defaults.addnoise_condition'")


# ------------------------------------------------------------------------------------------------------ errors


def test_unknown_shot_field_suggests_the_closest(folder: Path) -> None:
    text = edit("    frames: 25", "    frams: 25")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'frams')} shot 'open' field 'frams': unknown field 'frams'")
    assert "did you mean 'frames'?" in msg


def test_unknown_film_and_defaults_fields_suggest_the_closest(folder: Path) -> None:
    text = edit("resolution: 64x64", "resolutoin: 64x64", edit("  steps: 3", "  step: 3"))
    lines = error_of(folder, text).splitlines()
    assert lines[0].startswith(f"{where(folder, text, 'resolutoin')} field 'resolutoin'")
    assert "did you mean 'resolution'?" in lines[0]
    assert lines[1].startswith(f"{where(folder, text, 'step: 3')} field 'defaults.step'")
    assert "did you mean 'steps'?" in lines[1]


def test_continue_from_typo_suggests_an_id(folder: Path) -> None:
    text = edit("continue_from: open", "continue_from: opne")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'opne')} shot 'branch' field 'continue_from': no shot has id 'opne'")
    assert "did you mean 'open'?" in msg


def test_missing_image(folder: Path) -> None:
    text = edit("image: still.png", "image: gone.png")
    msg = error_of(folder, text)
    assert msg.startswith(
        f"{where(folder, text, 'gone.png')} shot 'portrait' field 'image': file not found: 'gone.png'"
    )


def test_unreadable_image(folder: Path) -> None:
    (folder / "notes.png").write_text("not a picture")
    text = edit("end_image: still.png", "end_image: notes.png")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'notes.png')} shot 'portrait' field 'end_image': cannot read")


def test_fresh_frames_off_grid(folder: Path) -> None:
    text = edit("frames: 25", "frames: 50")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'frames: 50')} shot 'open' field 'frames': 50 frames do not fit")
    assert "4k+1" in msg and "try 49 or 53" in msg


def test_continuing_frames_off_grid(folder: Path) -> None:
    text = edit("frames: 16", "frames: 15")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'frames: 15')} shot 'follow' field 'frames': 15 frames do not fit")
    assert "steps of 4" in msg and "try 12 or 16" in msg


def test_continue_from_cycle(folder: Path) -> None:
    text = edit("  - id: open\n", "  - id: open\n    continue_from: branch\n", edit("frames: 25", "frames: 24"))
    msg = error_of(folder, text)
    assert msg.startswith(
        f"{where(folder, text, 'continue_from: branch')} shot 'open' field 'continue_from': "
        "continuation cycle 'open' -> 'branch' -> 'open'"
    )


def test_continue_self_and_first_shot(folder: Path) -> None:
    text = edit("continue_from: open", "continue_from: branch")
    assert "cannot continue itself" in error_of(folder, text)
    text = edit("  - id: open\n", "  - id: open\n    continue: true\n")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'continue: true')} shot 'open' field 'continue': the first shot")


def test_duplicate_id(folder: Path) -> None:
    text = edit("id: branch", "id: follow")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'id: follow', nth=2)} shots[3] field 'id': duplicate id 'follow'")
    assert f"already used by shots[1] on line {line_of(text, 'id: follow')}" in msg


def test_invalid_id(folder: Path) -> None:
    text = edit("id: branch", "id: the branch")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'the branch')} shots[3] field 'id': 'the branch' is not a valid id")


@pytest.mark.parametrize("value", ["100x64", "hd", "64x8"])
def test_bad_resolution(folder: Path, value: str) -> None:
    text = edit("resolution: 64x64", f"resolution: {value}")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'resolution')} field 'resolution': resolution '{value}'")
    assert ("multiples of 16" in msg) if "x" in value else ("'540p', '720p' or 'WxH'" in msg)


def test_frames_and_duration_together(folder: Path) -> None:
    text = edit("    duration: 2.0\n", "    duration: 2.0\n    frames: 17\n")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'duration: 2.0')} shot 'portrait' field 'duration': give either")


def test_neither_frames_nor_duration(folder: Path) -> None:
    text = edit("    frames: 25\n", "")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'id: open')} shot 'open' field 'frames': missing")


def test_image_with_continue_and_transition_on_continuation(folder: Path) -> None:
    text = edit("    prompt: dusk\n", "    prompt: dusk\n    image: still.png\n    transition: {fade: 1}\n")
    lines = error_of(folder, text).splitlines()
    assert lines[0].startswith(f"{where(folder, text, '    image: still.png')} shot 'follow' field 'image'")
    assert lines[1].startswith(
        f"{where(folder, text, 'fade: 1')} shot 'follow' field 'transition': a transition is only allowed on a cut"
    )


def test_wrong_types_are_not_coerced(folder: Path) -> None:
    text = edit("    steps: 2", "    steps: '2'")
    msg, at = error_of(folder, text), where(folder, text, "steps: '2'")
    assert msg.startswith(f"{at} shot 'follow' field 'steps': input should be a valid integer, got '2'")


def test_grid_settings_and_overlap_longer_than_window(folder: Path) -> None:
    text = edit("  overlap_history: 5", "  overlap_history: 16")
    assert error_of(folder, text).startswith(
        f"{where(folder, text, 'overlap_history')} field 'defaults.overlap_history': overlap_history must be 4k+1"
    )
    text = edit("  overlap_history: 5", "  overlap_history: 17")
    msg = error_of(folder, text)
    assert msg.count("\n") == 0  # reported once at the default, not once per shot
    assert msg.startswith(
        f"{where(folder, text, 'overlap_history')} field 'defaults.overlap_history': "
        "overlap_history 17 hands over 5 latents, which leaves no room"
    )


def test_repeated_key_and_broken_yaml(folder: Path) -> None:
    text = edit("    frames: 25\n", "    frames: 25\n    frames: 29\n")
    msg = error_of(folder, text)
    assert msg.startswith(f"{where(folder, text, 'frames: 29')} shot 'open' field 'frames': 'frames' appears twice")
    text = edit("prompt: [dawn, noon]", "prompt: [dawn, noon")
    assert "not valid YAML" in error_of(folder, text)


def test_every_problem_is_reported_at_once(folder: Path) -> None:
    text = edit("frames: 25", "frames: 50", edit("continue_from: open", "continue_from: opne"))
    assert len(error_of(folder, text).splitlines()) == 2
