"""``aurl serve``: the HTTP API, the studio page and the listening test (see docs/serve.md).

Loopback (127.0.0.1) by default. Any other address needs a bearer token in the ``AURL_TOKEN``
environment variable (never on the command line, where other users could read it); clients send
``Authorization: Bearer <token>``, the pages ask for it once and keep it in a cookie.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from aurl.shipped import DEFAULT as DEFAULT_MODEL


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the models over HTTP: API, studio page, listening test",
        description=(
            "Start the Aurl server: the studio at http://HOST:PORT/, the listening test at "
            "/listen, the API documented at /docs. Example:\n"
            "  aurl serve --port 8000 --db listen.sqlite"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; "
                   "another address needs AURL_TOKEN set)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", nargs="+", metavar="NAME", help="shipped models to serve "
                       f"(default: {DEFAULT_MODEL!r}, the shipped chorale model)")  # fmt: skip
    which.add_argument("--checkpoint", nargs="+", metavar="DIR",
                       help="model folders to serve (named by the folder)")  # fmt: skip
    p.add_argument(
        "--db",
        default="aurl-listen.sqlite",
        metavar="PATH",
        help="SQLite file of the listening test's answers (default ./aurl-listen.sqlite)",
    )
    lim = p.add_argument_group("limits (over a limit a request gets a 4xx naming it)")
    lim.add_argument("--max-upload-bytes", type=int, default=1_000_000, metavar="N")
    lim.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                     help="tokens per request (default 4096)")  # fmt: skip
    lim.add_argument("--slots", type=int, default=16, metavar="N",
                     help="requests decoding together per model (default 16)")  # fmt: skip
    lim.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests waiting for a slot per model (default 64)")  # fmt: skip
    lim.add_argument("--request-seconds", type=float, default=120.0, metavar="S",
                     help="wall-clock seconds per request (default 120)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_folders(args: argparse.Namespace) -> dict[str, Path]:
    """Name -> folder of each model to serve, checked before anything loads.

    Raises:
        CheckpointError: a missing shipped model or checkpoint folder.
        ConfigError: two models with one name.
    """
    from aurl.cli.generate import model_folder
    from aurl.errors import ConfigError

    if args.checkpoint:
        pairs = [(Path(c).resolve().name, model_folder(c)) for c in args.checkpoint]
    else:
        pairs = [(n, model_folder(None, n)) for n in (args.model or [DEFAULT_MODEL])]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two models named alike ({', '.join(names)}): give distinct folders")
    return dict(pairs)


def run(args: argparse.Namespace) -> int:
    from aurl.errors import ConfigError

    loopback = is_loopback(args.host)
    token = os.environ.get("AURL_TOKEN") or None
    if not loopback and not token:
        raise ConfigError(
            f"--host {args.host} is not a loopback address: set AURL_TOKEN to a secret "
            "(clients then send 'Authorization: Bearer $AURL_TOKEN'), or serve on 127.0.0.1"
        )
    for flag in ("max_upload_bytes", "max_tokens", "slots", "max_queue", "threads"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give 1 or more")
    if args.request_seconds <= 0:
        raise ConfigError(f"--request-seconds {args.request_seconds:g}: give a positive time")
    from aurl.cli.generate import require_torch

    require_torch("aurl serve", "")  # the models load with torch (a ModuleNotFoundError)
    folders = model_folders(args)
    from aurl.cli.generate import model_voices

    voices = {name: model_voices(folder) for name, folder in folders.items()}  # a bad key: 1 line
    from aurl.serve.listen import Store

    Store(args.db).close()  # an unusable --db, or no upload folder: one line before models load
    upload_folder()
    import torch
    import uvicorn

    from aurl.cli.generate import load_model
    from aurl.serve.app import Settings, create_app
    from aurl.serve.engine import Limits

    torch.set_num_threads(args.threads)
    models = {name: load_model(str(folder), "cpu") for name, folder in folders.items()}
    from aurl.engines.native_engine import native_where_it_runs

    # harmonize / infill decode as `aurl harmonize` does by default: the native engine where it
    # runs the model (a chorale 4.5x faster than on the torch model), else the model
    composers = {name: native_where_it_runs(folder) for name, folder in folders.items()}
    limits = Limits(
        max_upload_bytes=args.max_upload_bytes, max_tokens=args.max_tokens, slots=args.slots,
        max_queue=args.max_queue, request_seconds=args.request_seconds,
    )  # fmt: skip
    settings = Settings(limits=limits, token=token, loopback=loopback, db=Path(args.db))
    app = create_app(models, settings, composers, voices)
    import socket

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): "
                          "pick another --port") from None  # fmt: skip
    port = sock.getsockname()[1]
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    line = (f"aurl serve: http://{host}:{port}/ (models: {', '.join(models)}; answers in "
            f"{args.db}; Ctrl-C stops)")  # fmt: skip
    # no permessage-deflate: a note message is ~80 bytes, and compressing each one cost the
    # event loop ~0.1 ms a note (zlib), time the decode thread waits for the GIL
    config = uvicorn.Config(
        app, log_level="warning", ws="websockets-sansio", ws_per_message_deflate=False
    )
    server = uvicorn.Server(config)
    import threading

    wildcard = args.host.strip("[]") in ("0.0.0.0", "::")
    at = ("[::1]" if ":" in args.host else "127.0.0.1") if wildcard else host
    threading.Thread(target=announce, args=(server, f"{at}:{port}", token, line),
                     daemon=True).start()  # fmt: skip
    server.run(sockets=[sock])
    return 0


def upload_folder() -> None:
    """Refuse to serve when no temporary folder is writable: each upload is parsed from a file
    written there (:mod:`aurl.serve.uploads`), so every upload would fail.

    Raises:
        ConfigError: TMPDIR, /tmp, /var/tmp and the working folder are all unwritable.
    """
    import tempfile

    from aurl.errors import ConfigError

    try:
        with tempfile.TemporaryDirectory(prefix="aurl-upload-"):
            pass
    except OSError as e:  # FileNotFoundError: "No usable temporary directory found in [...]"
        raise ConfigError(
            f"no writable temporary folder for uploads ({e}): set TMPDIR to a folder this "
            "user may write"
        ) from None


def announce(server, address: str, token: str | None, line: str) -> None:
    """Print the address once the server answers, after one short streamed request of its
    own over loopback: the first call of every layer (the socket handshake, the handlers, the
    masks, the model at batch 1) is paid here, not by the first listener."""
    import json
    import logging
    import time

    from websockets.sync.client import connect

    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with connect(f"ws://{address}/api/generate/stream", additional_headers=headers,
                     open_timeout=30, close_timeout=5) as ws:  # fmt: skip
            ws.send(json.dumps({"max_tokens": 24, "min_tokens": 16}))
            while json.loads(ws.recv(timeout=30))["type"] == "note":
                pass
    except Exception:  # noqa: BLE001 - a failed warm-up only costs the first listener time
        logging.getLogger("aurl.serve").warning("the warm-up request failed", exc_info=True)
    print(line, flush=True)
