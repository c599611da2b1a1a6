"""What the cold start of `aurl generate --engine onnx` leaves out keeps the pieces as they were:
no window restart once every row has ended, and a command line that registers its own command
alone parses as the full parser does."""

from __future__ import annotations

import numpy as np
import pytest

from aurl.config import GenerationConfig
from aurl.engines.onnx_engine import OnnxEngine
from aurl.generation.generate import generate


class Counting:
    """An engine whose ``init_state`` calls are counted (the engine itself does the work)."""

    def __init__(self, engine) -> None:
        self.engine, self.starts = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def init_state(self, *args, **kwargs):
        self.starts += 1
        return self.engine.init_state(*args, **kwargs)


@pytest.mark.parametrize("engine_kind", ["onnx", "torch"])
def test_no_window_restart_after_the_last_end(tiny_model, tiny_export, engine_kind) -> None:
    """A piece whose END fills the window exactly: the loop stops there instead of restarting
    the window (history features and an overlap prefill, ~5% of a 512-token cold start) for
    logits nobody reads; the ids equal a run whose window never fills."""
    from aurl.engines.torch_engine import TorchEngine

    base = OnnxEngine(tiny_export) if engine_kind == "onnx" else TorchEngine(tiny_model)
    cfg = GenerationConfig(max_tokens=40, seed=2, window=512)
    want = generate(Counting(base), cfg, num_samples=2)
    longest = max(len(p.ids) for p in want)
    # after the last END the cache holds every token but that END: the window is then full
    counted = Counting(base)
    got = generate(
        counted, GenerationConfig(max_tokens=40, seed=2, window=longest - 1), num_samples=2
    )
    for a, b in zip(want, got):
        assert np.array_equal(a.ids, b.ids)
    assert counted.starts == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--engine", "onnx", "--checkpoint", "x", "--out", "o", "--key", "D minor"],
        ["generate", "--out", "o", "--num-samples", "2", "--seconds", "30", "--top-p", "0.9"],
        ["data", "corpus", "--name", "bach-chorales", "--out", "c"],
        ["export", "--format", "onnx", "--int8", "--out", "e"],
        ["train", "--preset", "tiny", "--out", "r", "training.lr=1e-3"],
    ],
)
def test_one_command_parses_as_the_full_parser(argv) -> None:
    from aurl.cli import build_parser

    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_a_command_line_imports_its_own_command_alone() -> None:
    """`aurl generate ...` builds a parser from aurl.cli.generate alone (the other commands'
    modules and what they import are no part of its cold start); `aurl --help` lists all."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\nfrom aurl.cli import build_parser\nbuild_parser(sys.argv[1:])\n"
        "print(*sorted(m for m in sys.modules if m.startswith('aurl.cli.')))\n"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    run = [sys.executable, "-c", code]
    one = subprocess.run([*run, "generate", "--out", "o"], capture_output=True, text=True, env=env)
    assert one.stdout.split() == ["aurl.cli.generate"], one.stderr
    every = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env)
    assert "aurl.cli.train" in every.stdout.split() and "aurl.cli.serve" in every.stdout.split()


def _configs():
    """Every preset, the shipped models' configs and a generation config with the strings
    users give (a key with a space, a meter with a slash)."""
    import dataclasses
    import json
    from pathlib import Path

    from aurl.config import Config, config_from_dict, load_config, preset_names

    out = [Config()] + [load_config(preset=name) for name in preset_names()]
    pretrained = Path(__import__("aurl").__file__).parent / "pretrained"
    for path in sorted(pretrained.glob("**/config.json")):
        data = json.loads(path.read_text())
        out.append(config_from_dict({k: data[k] for k in ("vocab", "model") if k in data}))
    gen = GenerationConfig(key="D minor", meter="6/8", temperature=0.9, top_p=1e-05)
    return out + [dataclasses.replace(Config(), generation=gen)]


def test_settings_yaml_is_pyyaml_s_own_text_without_pyyaml() -> None:
    """`aurl generate` writes its settings without importing PyYAML (~30 ms of a cold start):
    the text equals yaml.safe_dump's, character for character, for every preset and shipped
    model, and reads back as the same config."""
    import yaml

    from aurl.config import dump_simple_yaml

    for config in _configs():
        data = config.to_dict()
        assert dump_simple_yaml(data) is not None  # the fast path covers real configs
        assert config.to_yaml() == yaml.safe_dump(data, sort_keys=False)
        assert yaml.safe_load(config.to_yaml()) == data


@pytest.mark.parametrize(
    "value",
    ["yes", "Off", "NULL", "1:20", "a: b", "x #y", " lead", "trail ", "12", "1e3", "~", "-", "a" * 50,
     "é", "two  spaces", 1e-05, 1e16, float("inf"), float("nan"), -0.0, [1, "no"], [{"a": 1}]],
)  # fmt: skip
def test_values_the_fast_path_cannot_write_go_to_pyyaml(value) -> None:
    """A value outside the simple cases is written by PyYAML (the fast path says None) or, for
    numbers, as PyYAML writes them; either way the text reads back as the value."""
    import yaml

    from aurl.config import dump_simple_yaml

    data = {"generation": {"key": value}}
    text = dump_simple_yaml(data)
    if text is not None:
        assert text == yaml.safe_dump(data, sort_keys=False)
    back = yaml.safe_load(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    assert back == data or (
        value != value and back["generation"]["key"] != back["generation"]["key"]
    )


def test_generate_never_imports_pyyaml(tiny_export, tmp_path) -> None:
    """The whole `aurl generate --engine onnx` run, settings file included, leaves PyYAML out."""
    import subprocess
    import sys

    code = (
        "import sys; from aurl.cli import main; "
        f"main(['generate', '--engine', 'onnx', '--checkpoint', {str(tiny_export)!r}, "
        f"'--out', {str(tmp_path)!r}, '--max-tokens', '32']); "
        "print('yaml' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "sample_seed0.yaml").read_text().startswith("# aurl generate")


@pytest.mark.parametrize(
    "argv, collector",
    [
        (["generate", "--engine", "onnx", "--max-tokens", "32", "--force"], "True frozen 1"),
        (["export", "--format", "onnx", "--int8", "--int4", "--out", "x"], "True none None"),
    ],
    ids=["generate", "export"],
)
def test_the_console_runs_generate_without_the_cyclic_collector(
    tiny_export, tmp_path, argv, collector
) -> None:
    """`aurl generate` imports and builds its engine with gc off, which saved ~7% of a cold
    start's CPU, then freezes what that made and collects again during the generation (a run
    of many pieces stays bounded); other commands (training, serving: long-lived) keep the
    collector throughout; generate also keeps numpy's OpenBLAS to one thread (its spinning threads
    cost ~0.12 s of another core); either way the work and exit status are those of main()."""
    import os
    import subprocess
    import sys

    if argv[0] == "generate":
        argv = [*argv, "--checkpoint", str(tiny_export), "--out", str(tmp_path)]
    code = (
        "import atexit, gc, os, sys; atexit.register(lambda: print('collector', gc.isenabled(), "
        "'frozen' if gc.get_freeze_count() else 'none', os.environ.get('OPENBLAS_NUM_THREADS'))); "
        f"sys.argv = ['aurl', *{argv!r}]; from aurl.cli import console; console()"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip().splitlines()[-1] == f"collector {collector}"
    assert run.returncode == (0 if argv[0] == "generate" else 2)
    if argv[0] == "generate":
        assert (tmp_path / "sample_seed0_000.mid").is_file()
