"""Hostile storyboards (issue 13), shared by the parser/CLI tests and the Serve tests.

Each is small on the wire and would cost the unbounded loader minutes or gigabytes: aliases and merge keys that
multiply, nesting past the recursion limit, more shots than anyone renders, a novel for a prompt, bytes that are not
UTF-8.  Every one stays under a 64-alias count limit, so counting aliases alone does not stop it.
"""

from __future__ import annotations

import json

SHOT = "  - id: harbor\n    frames: 9\n    prompt: a harbor at dawn\n"


def alias_bomb(levels: int = 20, width: int = 3) -> str:
    """``levels * width + 1`` aliases (61), each list naming the previous one ``width`` times: the prompt holds
    width**(levels+1) strings (3**21, ten billion)."""
    lines = ["title: alias bomb", "x0: &a0 [lol, lol, lol]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\nshots:\n  - id: harbor\n    frames: 9\n    prompt: *a" + str(levels) + "\n"


def merge_bomb(levels: int = 20, width: int = 3) -> str:
    """Merge keys that each merge ``width`` copies of the previous mapping (60 aliases).  PyYAML copies every pair
    of every merged mapping while it constructs, so the last mapping's pair list grows as width**levels (3**20, three
    billion), though the dict it becomes has only a few dozen keys."""
    lines = ["title: merge bomb", "m0: &m0 {k0: v, k1: v, k2: v}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * width)}], own{i}: v}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\nshots:\n" + SHOT


def deep_nesting(levels: int = 100_000) -> str:
    return "title: deep\nshots: " + "[" * levels + "]" * levels + "\n"


def deep_json(levels: int = 100_000) -> str:
    return '{"title": "deep", "shots": ' + "[" * levels + "]" * levels + "}"


def many_shots(count: int = 10_000) -> str:
    shots = [{"id": f"s{i}", "frames": 9, "prompt": f"shot {i}"} for i in range(count)]
    return json.dumps({"title": "many", "shots": shots})


def many_shots_yaml(count: int = 10_000) -> str:
    return "title: many\nshots:\n" + "".join(f"  - id: s{i}\n    frames: 9\n    prompt: shot {i}\n" for i in range(count))


def long_prompt(chars: int = 1_000_000) -> str:
    return "title: long\nshots:\n  - id: harbor\n    frames: 9\n    prompt: " + "x" * chars + "\n"


def not_utf8() -> bytes:
    return b"title: bytes\nshots:\n  - id: harbor\n    frames: 9\n    prompt: caf\xe9 \xff\xfe\n"


HOSTILE_TEXT = {
    "alias bomb": alias_bomb,
    "merge bomb": merge_bomb,
    "deep nesting": deep_nesting,
    "deep json": deep_json,
    "10,000 shots": many_shots,
    "10,000 shots yaml": many_shots_yaml,
    "1,000,000-character prompt": long_prompt,
}
