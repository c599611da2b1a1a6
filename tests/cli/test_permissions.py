"""Files and folders this user may not open (session 8): an unreadable input, an unlistable
folder, an unwritable ``--out`` or ``--db``, no writable temporary folder for the server's
uploads. Each gets exit code 2 and one ``error:`` line naming the path, never a traceback.

The sessions run as root, which ignores mode bits, so as root each command runs with the two
capabilities that let root past them dropped (``setpriv --bounding-set=-dac_override,
-dac_read_search``): root then obeys the mode bits of the files it owns, which is what a user
meets on files that are not theirs; as another user the commands run as they are. The upload
folder cases also need a mount namespace (``unshare -m``, root only) to make /tmp and /var/tmp
read-only; they are skipped elsewhere. Run for real in session 8 (as root, with both tools).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHORALE = ROOT / "tests" / "fixtures" / "midi" / "bach_bwv66.6.mid"
DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _prefix() -> list[str]:
    return DROP if os.geteuid() == 0 else []


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A tiny model, and copies of it and of a chorale that this user may not open."""
    import torch

    from aurl.config import ModelConfig, VocabConfig
    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.pretrained import save_pretrained

    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root, and no setpriv to drop the capabilities that ignore mode bits")
    d = tmp_path_factory.mktemp("perm")
    torch.manual_seed(0)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=256
    )
    save_pretrained(MusicTransformerVAEGAN(config, VocabConfig()).eval(), d / "tiny")
    shutil.copytree(d / "tiny", d / "noweights")
    (d / "noweights" / "model.safetensors").chmod(0)
    shutil.copytree(d / "tiny", d / "noconfig")
    (d / "noconfig" / "config.json").chmod(0)
    (d / "locked").mkdir()
    shutil.copy(CHORALE, d / "locked" / "a.mid")
    (d / "locked" / "index.npz").write_bytes(b"")
    (d / "locked").chmod(0)
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    (d / "rw").mkdir()
    probe = subprocess.run([*_prefix(), "cat", str(d / "noweights" / "model.safetensors")],
                           capture_output=True)  # fmt: skip
    if probe.returncode == 0:
        pytest.skip("cannot drop the rights that ignore mode bits here (a container's policy)")
    yield d
    for p in (d / "locked", d / "ro", d / "noweights" / "model.safetensors",
              d / "noconfig" / "config.json"):  # fmt: skip
        p.chmod(0o755)


def aurl(*args: str, cwd: Path, prefix: list[str] | None = None) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*(_prefix() if prefix is None else prefix), sys.executable, "-m", "aurl",
                        *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    return r.returncode, r.stdout + r.stderr


def one_error_line(output: str, *names: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


CASES = {  # name -> (arguments with {d} for the tree, what the line names); was a traceback
    "generate: unreadable weights": (
        "generate --checkpoint {d}/noweights --max-tokens 16 --out {d}/rw/g",
        "noweights/model.safetensors: permission denied",
    ),
    "generate: an unreadable config": (  # was "config.json is damaged (... Permission denied)"
        "generate --checkpoint {d}/noconfig --max-tokens 16 --out {d}/rw/g2",
        "noconfig/config.json: permission denied",
    ),
    "harmonize: a melody in a folder it may not open": (
        "harmonize {d}/locked/a.mid --out {d}/rw/h",
        "locked/a.mid: permission denied",
    ),
    "data prepare: a folder it may not list": (
        "data prepare {d}/locked --out {d}/rw/c",
        "locked/: permission denied",
    ),
    "evaluate: a cache it may not open": (
        "evaluate --checkpoint {d}/tiny --data {d}/locked --out {d}/rw/e",
        "locked/index.npz: permission denied",
    ),
    "analyze: a folder it may not list": (  # was "holds no MIDI files"
        "analyze {d}/locked --out {d}/rw/a --no-plots",
        "locked: permission denied",
    ),
    "generate: --out in a folder it may not write": (  # already one line (checks.out_dir)
        "generate --checkpoint {d}/tiny --max-tokens 16 --out {d}/ro/g",
        "is not writable",
    ),
    "serve: --db in a folder it may not write": (  # was a sqlite3 traceback
        "serve --checkpoint {d}/tiny --port 0 --db {d}/ro/listen.sqlite",
        "--db {d}/ro/listen.sqlite: cannot open",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_path_it_may_not_open_is_one_line(tree, case):
    args, names = CASES[case]
    code, output = aurl(*args.format(d=tree).split(), cwd=tree / "rw")
    one_error_line(output, names.format(d=tree))
    assert code == 2, output


# --------------------------------------------------------------------------------------------
# No writable temporary folder: /tmp and /var/tmp read-only in a mount namespace (root only)
# --------------------------------------------------------------------------------------------


def masked_tmp(command: list[str], cwd: str) -> subprocess.CompletedProcess:
    """``command`` with /tmp and /var/tmp read-only (still readable: the checkout may be under
    /tmp), in ``cwd`` (read-only too), no TMPDIR."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("a mount namespace needs root, unshare and setpriv")
    # read-only bind mounts, not empty ones: a checkout or venv under /tmp stays readable
    script = ("for d in /tmp /var/tmp; do mount --bind $d $d && mount -o remount,ro,bind $d "
              f"|| exit 1; done && cd {cwd} && exec {' '.join(DROP)} \"$@\"")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], env=env,
                       input=CHORALE.read_bytes(), capture_output=True, timeout=90)  # fmt: skip
    if b"mount:" in r.stderr[:200] or b"unshare:" in r.stderr[:200]:
        pytest.skip(f"no mount namespace here: {r.stderr[:200]!r}")
    return r


def test_serve_without_an_upload_folder_is_one_line(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm for the database outside the masked folders")
    db = shm / f"aurl-test-{os.getpid()}.sqlite"
    try:
        r = masked_tmp([sys.executable, "-m", "aurl", "serve", "--port", "0", "--db", str(db)],
                       cwd="/proc")  # fmt: skip
    finally:
        for p in shm.glob(db.name + "*"):
            p.unlink()
    output = (r.stdout + r.stderr).decode()
    one_error_line(output, "no writable temporary folder for uploads", "TMPDIR")
    assert r.returncode == 2, output


def test_an_upload_without_a_folder_is_the_servers_503_not_the_files_422():
    code = ("import asyncio, sys\n"
            "from aurl.serve.uploads import UploadError, parse_upload\n"
            "try:\n    asyncio.run(parse_upload(sys.stdin.buffer.read(), 'notes', name='c.mid'))\n"
            "except UploadError as e:\n    print(e.status, e.limit, e)\n")  # fmt: skip
    r = masked_tmp([sys.executable, "-c", code], cwd="/proc")
    # was 422 "c.mid: the MIDI parser stopped with an error (...): the file is damaged"
    out = r.stdout.decode()
    assert out.startswith("503 upload_folder the server cannot write its upload folder"), out
    assert "c.mid" not in out and "TMPDIR" in out
