"""Hostile YAML given to every command that takes ``--config`` (here ``aurl config show``):
each once escaped as a traceback or ran for minutes and gigabytes (docs/design.md, "Hostile
inputs, session 19 (commands)"); now each is one ``error:`` line naming the file or key."""

from __future__ import annotations

import os

import pytest

from aurl.cli import main

# 9 lists of 9 of ... of 9 strings: 9**9 items in a few hundred bytes of YAML aliases
BOMB = "&i [&h [&g [&f [&e [&d [&c [&b [&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]" + "".join(
    f", *{a},*{a},*{a},*{a},*{a},*{a},*{a},*{a}]" for a in "abcdefgh"
)

# file name -> (its text, exit code, what the one line must name); before: the escape
# fmt: off
CASES = {
    # TypeError: a base that is no file name
    "base_number.yaml": ("base: 5\n", 2, "base: 5: give a file name"),
    "base_list.yaml": ("base: [a, b]\n", 2, "base: ['a', 'b']: give a file name"),
    # 'does not exist' for a device, a folder, a symlink loop
    "base_device.yaml": ("base: /dev/zero\n", 2, "/dev/zero is not a regular file"),
    "base_folder.yaml": ("base: .\n", 2, "config file {dir} is a folder"),
    "base_loop.yaml": ("base: loop.yaml\n", 2, "loop.yaml is a loop of symbolic links"),
    # ValueError from int() past 4,300 digits; RecursionError in PyYAML's composer
    "digits.yaml": ("model:\n  d_model: " + "9" * 5000 + "\n", 2, "digits.yaml is not valid YAML"),
    "deep.yaml": ("model: " + "[" * 5000 + "]" * 5000 + "\n", 2, "deep.yaml is nested too deeply"),
    # an alias bomb shown in full in the error line: minutes and 5.8 GB, then the line
    "bomb_section.yaml": (f"model: {BOMB}\n", 2, "model: expected a mapping of ModelConfig"),
    "bomb_value.yaml": (f"training:\n  lr: {BOMB}\n", 2, "training.lr: expected a number"),
    # 200 MB of YAML: PyYAML past 60 s
    "huge.yaml": ("model:\n  d_model: 32\n#" + "x" * (2**20 + 1) + "\n", 2,
                  "huge.yaml is 1,048,600 bytes, over the 1,048,576"),
}
# fmt: on


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_yaml_gets_one_line_naming_it(name, tmp_path, capsys) -> None:
    text, code, names = CASES[name]
    os.symlink(tmp_path / "loop.yaml", tmp_path / "loop.yaml")
    (tmp_path / name).write_text(text)
    assert main(["config", "show", "--config", str(tmp_path / name)]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:2000]
    assert names.format(dir=tmp_path) in lines[0], lines[0]
    assert len(lines[0]) < 300, "the line shows the whole value"


@pytest.mark.parametrize("override", ["model.d_model=" + "9" * 5000,
                                      "model.styles=" + "[" * 5000 + "]" * 5000])  # fmt: skip
def test_an_override_yaml_cannot_read_is_taken_as_text(override, capsys) -> None:
    """``key=value`` values are read as YAML: 5,000 digits (ValueError) and 5,000 brackets
    (RecursionError) were tracebacks; now the text is the value, and its type is the error."""
    assert main(["config", "show", override]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {override.split('=')[0]}: expected")
    assert len(lines[0]) < 300, lines[0][:300]


def test_an_empty_preset_is_no_preset(capsys) -> None:
    """``--preset ''`` ran with the defaults, as if no preset were given."""
    assert main(["config", "show", "--preset", ""]) == 2
    assert "unknown preset ''" in capsys.readouterr().err
