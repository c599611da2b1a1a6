"""The torch-free installation (`pip install .`, no [torch] extra): `aurl generate --engine onnx`
runs with the [torch] extra's packages unimportable, needs only the base dependencies, and every
command that needs PyTorch says in one line what to install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what `pip install .` leaves out: the [torch] extra (an import of these fails)
BLOCK = "import sys\nfor m in ('torch', 'safetensors', 'onnx', 'tensorboard'):\n    sys.modules[m] = None\n"


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "AURL_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,  # what a command writes where it runs stays out of the checkout
    )


def _requirement_names(requirements: list[str]) -> set[str]:
    return {
        re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
    }


def test_generation_runs_without_the_torch_extra(tiny_export, tmp_path) -> None:
    code = BLOCK + (
        "from aurl.cli import main\n"
        f"rc = main(['generate', '--engine', 'onnx', '--checkpoint', {str(tiny_export)!r}, "
        f"'--out', {str(tmp_path / 'pieces')!r}, '--max-tokens', '48', '--key', 'D minor'])\n"
        "print('rc', rc)\n"
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "rc 0", r.stderr
    assert (tmp_path / "pieces" / "sample_seed0_000.mid").stat().st_size > 100


@pytest.mark.parametrize("engine", [[], ["--engine", "native"]], ids=["default", "native"])
def test_native_generation_runs_without_the_torch_extra_or_onnxruntime(engine, tmp_path) -> None:
    """`aurl generate` (its default, auto, runs the native step) and `--engine native` on the
    shipped default with the [torch] extra's packages and onnxruntime unimportable: the model
    folder is read by Aurl's own safetensors reader."""
    code = (
        BLOCK
        + "sys.modules['onnxruntime'] = None\n"
        + (
            "from aurl.cli import main\n"
            f"rc = main(['generate', *{engine!r}, '--out', {str(tmp_path / 'pieces')!r}, "
            "'--max-tokens', '48', '--key', 'D minor'])\n"
            "print('rc', rc)\n"
        )
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "rc 0", r.stderr
    assert (tmp_path / "pieces" / "sample_seed0_000.mid").stat().st_size > 100
    header = (tmp_path / "pieces" / "sample_seed0.yaml").read_text().splitlines()[1]
    assert header.startswith("# engine: native, int8 weights of "), header


@pytest.mark.parametrize(
    "argv, says",
    [
        (["generate", "--engine", "torch", "--out", "OUT"], "pip install 'aurl[torch]'"),
        # the default (auto) goes to torch for what the native step does not do
        (["generate", "--beam", "2", "--out", "OUT"], "pip install 'aurl[torch]'"),
        (["export", "--format", "onnx", "--out", "OUT"], "pip install 'aurl[torch]'"),
        (["train", "--data", "OUT", "--out", "OUT"], "aurl train needs PyTorch"),
        (["serve", "--port", "0"], "aurl serve needs PyTorch"),
        # the shipped model's graphs are not cached yet: writing them needs torch
        (["generate", "--engine", "onnx", "--out", "OUT"], "where aurl[torch] is installed"),
    ],
)
def test_what_needs_torch_says_what_to_install(argv, says, tmp_path) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code = BLOCK + f"from aurl.cli import main\nsys.exit(main({argv!r}))\n"
    r = _run(code, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and says in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_the_onnx_run_needs_only_the_base_dependencies(tiny_export, tmp_path) -> None:
    """Every package a whole `aurl generate --engine onnx` imports (beyond what the interpreter
    had at start) is a base dependency of pyproject.toml, and torch is not one."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    assert not base & _requirement_names(project["optional-dependencies"]["torch"])
    code = (
        "import json, sys\nbefore = set(sys.modules)\nfrom aurl.cli import main\n"
        f"assert main(['generate', '--engine', 'onnx', '--checkpoint', {str(tiny_export)!r}, "
        f"'--out', {str(tmp_path / 'pieces')!r}, '--max-tokens', '48']) == 0\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "files = {m: getattr(sys.modules.get(m), '__file__', None) or '' for m in new}\n"
        "print(json.dumps(sorted(m for m, f in files.items() if 'site-packages' in f)))\n"
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    imported = json.loads(r.stdout.strip().splitlines()[-1])
    assert "numpy" in imported and "onnxruntime" in imported
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    needed = {d.lower().replace("_", "-") for m in imported for d in owners.get(m, [m])}
    assert needed <= base, f"imported but not in [project] dependencies: {needed - base}"


def test_the_readme_commands_name_real_extras_and_parse() -> None:
    """The README's two commands and its "Without torch" commands: every extra they install
    exists in pyproject.toml (the first installs [torch], which holds torch), and every `aurl`
    command line in them parses (a renamed flag or command breaks this test, not a user's first
    run)."""
    import shlex

    tomllib = pytest.importorskip("tomllib")
    from aurl.cli import build_parser

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    without = readme.split("## Without torch", 1)[1]
    lines = [*blocks[0].split("&&"), *blocks[1].split("&&")]
    lines += re.findall(r"```bash\n(.*?)```", without, re.S)[0].splitlines()
    installed, parsed = [], 0
    for line in lines:
        words = shlex.split(line.split("#", 1)[0])
        if "install" in words and any(w.startswith(".[") for w in words):
            spec = next(w for w in words if w.startswith(".["))
            installed.append(spec[2:-1].split(","))
        if words and words[0].endswith("aurl"):
            build_parser(words[1:]).parse_args(words[1:])
            parsed += 1
    assert installed[0] == ["torch"] and "torch" in _requirement_names(extras["torch"])
    assert all(set(names) <= set(extras) for names in installed)
    assert parsed >= 5  # corpus, prepare, generate; export, generate --engine onnx


def test_harmonizing_by_default_needs_neither_torch_nor_onnxruntime(tmp_path) -> None:
    """`aurl harmonize` with no --engine on the shipped default (its default, auto, runs the
    native step) with the [torch] extra's packages and onnxruntime unimportable."""
    melody = ROOT / "src/aurl/data/bundled/bach-chorales/bach_bwv117.4.mid"
    code = (
        BLOCK
        + "sys.modules['onnxruntime'] = None\n"
        + (
            "from aurl.cli import main\n"
            f"rc = main(['harmonize', {str(melody)!r}, '--out', {str(tmp_path / 'h')!r}])\n"
            "print('rc', rc)\n"
        )
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "rc 0", r.stderr
    assert "given notes kept 100%" in r.stdout
    assert (tmp_path / "h" / "bach_bwv117.4_harmonized_seed0_000.mid").stat().st_size > 100
