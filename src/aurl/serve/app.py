"""The FastAPI app: JSON/MIDI endpoints, the streaming socket, the studio and listening pages.

Every error a client can cause comes back as a 4xx with a JSON body
``{"error": "<what was wrong and what to do>", "limit": <name or null>, "field": <name or
null>}``: fields out of range or of the wrong type (422, never clamped), uploads that are not
MIDI (422), bodies over ``max_upload_bytes`` (413), a full queue (429), a request over its time
(408). The schemas are documented in the OpenAPI page at ``/docs`` and in docs/serve.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import logging
import random
import time
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aurl.errors import AurlError, ConfigError
from aurl.serve import listen
from aurl.serve.engine import LimitError, Limits, ModelServer
from aurl.serve.uploads import UploadError, parse_upload

log = logging.getLogger("aurl.serve")
STATIC = Path(str(resources.files("aurl.serve") / "static"))
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
COOKIE = "aurl_token"
MAX_FIELD_BYTES = 64 * 1024  # room for the form fields / JSON around an uploaded file
MUSICXML = "application/vnd.recordare.musicxml+xml"
PARTICLES_HELP = (
    "sequential Monte Carlo rows (1: forcing alone, the default; 8: voices that fit the melody "
    "better, ~8x the time)"
)
FORMAT_HELP = "the reply: 'midi' (a MIDI file) or 'musicxml' (quantized to sixteenth notes)"


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def is_numeric(annotation: Any) -> bool:
    """Whether a field's type holds an int or a float anywhere (``float | None``, ``list[int]``),
    bool aside."""
    if annotation in (int, float):
        return True
    return any(is_numeric(a) for a in typing.get_args(annotation))


class JsonBody(BaseModel):
    """A JSON request body. JSON ``true`` / ``false`` is no number: pydantic's lax mode reads
    ``true`` as 1 (Python's bool is an int), so every int or float field, and every item of a
    list of them, refuses it here, naming the field (422)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        numeric = is_numeric(cls.model_fields[info.field_name].annotation)
        if numeric and any(isinstance(v, bool) for v in items):
            raise PydanticCustomError("bool_not_number", "expected a number, got true or false")
        return value


class GenerateOptions(JsonBody):
    """Options of ``POST /api/generate`` and the first message of ``WS /api/generate/stream``.
    Every field is optional; the defaults are ``aurl generate``'s."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    model: str | None = Field(None, description="a model from /api/health (default: the first)")
    max_tokens: int | None = Field(
        None, ge=8, description="length limit in tokens (default 1024; at most the server's "
        "max_tokens limit)",
    )  # fmt: skip
    seconds: float | None = Field(
        None, gt=0, description="length limit in seconds of music (instead of max_tokens)"
    )
    min_tokens: int = Field(0, ge=0, description="no END before this many generated tokens")
    temperature: float = Field(1.0, ge=0, le=100, description="0 = greedy")
    top_k: int = Field(0, ge=0, le=100_000, description="keep the K likeliest ids (0: off)")
    top_p: float = Field(1.0, ge=0, le=1, description="nucleus mass (1: off)")
    min_p: float = Field(0.0, ge=0, le=1, description="min-p threshold (0: off)")
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="> 1 discourages repeats")
    key: str = Field("", max_length=40, description="e.g. 'D minor'; 'primer': the primer's")
    key_strictness: float = Field(1.0, ge=0, le=1, description="1 masks out-of-key notes")
    style: str = Field(
        "", max_length=40, description="one of the model's styles (its `styles` in "
        "/api/health, e.g. the shipped `styles` model's 'folk'); '': none",
    )  # fmt: skip
    pitch_low: int = Field(21, ge=0, le=127)
    pitch_high: int = Field(108, ge=0, le=127)
    tempo: float | None = Field(None, gt=0, le=1000, description="fixed tempo in BPM")
    tempo_range: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[low, high] BPM"
    )
    instruments: list[int] | None = Field(
        None, max_length=16, description="allowed General MIDI families (program // 8)"
    )
    density: float = Field(0.0, ge=0, le=64, description="target notes per beat (0: free)")
    polyphony: int = Field(8, ge=1, le=128, description="most notes sounding at once")
    voice_leading: StrictBool = Field(
        False, description="no note that moves in parallel fifths or octaves with a lower "
        "voice (`aurl generate --voice-leading`, its default with --voices)",
    )  # fmt: skip
    voices: int = Field(
        0, ge=0, le=8, description="the voices the piece is written in (`aurl generate "
        "--voices`): the reply's notes on that many tracks (Soprano, Alto, Tenor, Bass for 4), "
        "and with voice_leading a chord of that many notes read voice by voice from the "
        "bottom; 0: one track, the voices unknown",
    )  # fmt: skip
    spacing: float = Field(
        0.0, ge=0, le=0.999, description="a note more than an octave above the note under it "
        "(the lowest excepted) gets log(1 - spacing): upper voices within an octave (`aurl "
        "generate --spacing`, 0.9 with voice leading there)",
    )  # fmt: skip
    ranges: float = Field(
        0.0, ge=0, le=0.999, description="with voices 2-4: a note outside the textbook range "
        "of the SATB voice of its rank from the bottom gets log(1 - ranges) (`aurl generate "
        "--ranges`, 0.9 with voice leading there)",
    )  # fmt: skip
    seed: int = Field(0, ge=0, le=2**63 - 1)
    primer: str | None = Field(None, description="a MIDI file to continue, base64")
    primer_seconds: float = Field(0.0, ge=0, le=3600, description="use only its first S s")
    format: Literal["midi", "musicxml"] = Field(
        "midi", description="the reply: a MIDI file, or MusicXML (quantized to sixteenths); the "
        "stream's done message always carries MIDI",
    )  # fmt: skip
    cadence: Literal["off", "phrases", "thorough", "ending"] = Field(
        "off", description="with seconds, POST /api/generate only: `aurl generate --cadence`'s "
        "search for phrases and an ending that close ('phrases', the CLI's default: ~1.8x the "
        "CPU, most pieces end on a cadence); it runs outside the shared batch, one such request "
        "per model at a time, so 'off' is the server's default (docs/design.md)",
    )  # fmt: skip


class HealthModel(BaseModel):
    name: str
    vocab_size: int
    mode: str
    parameters: int
    active: int
    waiting: int
    slots: int
    composing: int = Field(0, description="harmonize / infill requests running (one at a time)")
    styles: list[str] = Field([], description="the styles a request's `style` may name")
    voices: int = Field(0, description="the voices the model is written in (its config.json's "
                        "`voices`, `aurl generate`'s default; 0: none said): the studio's Voices "
                        "default, not the API's")  # fmt: skip


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    vocab_size: int
    details: list[HealthModel]
    limits: dict[str, float | int]


class ErrorBody(BaseModel):
    error: str
    limit: str | None = None
    field: str | None = None


class TrialRequest(JsonBody):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = None


class Answer(JsonBody):
    model_config = ConfigDict(extra="forbid")
    trial: str = Field(..., max_length=64)
    choice: Literal["A", "B"] = Field(..., description="the side the listener thinks is Bach")


ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [
        (408, "over request_seconds"), (413, "over max_upload_bytes"),
        (422, "a field or file is wrong (the message says which)"),
        (429, "over max_queue"),
    ]
}  # fmt: skip


def host_name(header: str) -> str:
    """The host of a Host header, lower case, its port dropped: ``[::1]:8000`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal: its colons are not the port's
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _LoopbackHosts:
    """Refuse a request (HTTP or WebSocket) whose Host is no loopback name (:data:`LOOPBACK_HOSTS`)
    with 400 in the error shape, ``field: "host"``: a page elsewhere cannot reach a loopback
    server through DNS rebinding (Starlette's TrustedHostMiddleware answered in plain text, and
    let ``testserver`` in for the tests)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(host) not in LOOPBACK_HOSTS:
                reply = _error(400, f"Host {host!r}: this server answers on 127.0.0.1, "
                               "localhost and [::1] only (to serve others: aurl serve --host "
                               "ADDRESS with AURL_TOKEN set)", field="host")  # fmt: skip
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(status: int, message: str, *, limit: str | None = None, field: str | None = None):
    return JSONResponse({"error": message, "limit": limit, "field": field}, status_code=status)


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    limits: Limits = dataclasses.field(default_factory=Limits)
    token: str | None = None  # bearer token (AURL_TOKEN); None: no authentication
    loopback: bool = True  # bound to a loopback address: only loopback Host headers
    db: Path = Path("aurl-listen.sqlite")


def create_app(
    models: dict[str, Any],
    settings: Settings | None = None,
    composers: dict[str, Any] | None = None,
    voices: dict[str, int] | None = None,
) -> FastAPI:
    """The app serving ``models`` (name -> a loaded model in eval mode).

    Args:
        models: At least one model; the first is the default.
        settings: Limits, token, host policy and the listening test's database.
        composers: Per model name, the engine of the same weights that harmonize and infill
            decode with (``aurl serve``: the native engine where it runs the model, as the
            composing commands' ``--engine auto``); absent: the model itself.
        voices: Per model name, the voices it is written in (``cli.generate.model_voices``),
            reported by ``/api/health`` for the studio's Voices menu; absent: 0.
    """
    if not models:
        raise ConfigError("aurl serve needs at least one model")
    s = settings or Settings()
    lim = s.limits
    servers: dict[str, ModelServer] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for server in servers.values():
            server.close()
        store.close()

    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load Swagger/ReDoc from a CDN: ours is self-contained
        redoc_url=None,
        title="Aurl",
        version=_version(),
        description="Compose, harmonize, infill and analyse MIDI with Aurl. Errors are JSON "
        '`{"error", "limit", "field"}` with a 4xx status. See docs/serve.md.',
    )
    composers, voices = composers or {}, voices or {}
    servers.update({name: ModelServer(name, m, lim, composers.get(name))
                    for name, m in models.items()})  # fmt: skip
    store = listen.Store(s.db)
    app.state.servers, app.state.store, app.state.settings = servers, store, s
    if s.loopback:  # a page elsewhere cannot reach this server through DNS rebinding
        app.add_middleware(_LoopbackHosts)

    # -- errors --------------------------------------------------------------------------------

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        """Starlette's own errors in the error shape (they were ``{"detail"}``, naming nothing):
        a body it cannot parse (400: not UTF-8, nested too deep for json.loads, a number of over
        4,300 digits, a broken multipart form), an unknown path (404), a wrong method (405)."""
        path, code = request.url.path, exc.status_code
        if code == 400:
            multipart = "multipart" in request.headers.get("content-type", "")
            what = ("multipart/form-data with the MIDI file in the field 'file'" if multipart
                    else "a JSON object in UTF-8 (numbers of at most 4,300 digits)")  # fmt: skip
            message, field = f"body: {str(exc.detail).rstrip('.')} (at {path}): send {what}", "body"
        elif code in (404, 405):
            message, field = f"{request.method} {path}: {exc.detail}: see /docs", None
        else:
            message, field = f"{path}: {exc.detail}", None
        r = _error(code, message, field=field)
        r.headers.update(exc.headers or {})
        return r

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc.errors()), field=_first_field(exc.errors()))

    @app.exception_handler(LimitError)
    async def _limit(request: Request, exc: LimitError):
        return _error(exc.status, str(exc), limit=exc.limit, field=exc.field)

    @app.exception_handler(UploadError)
    async def _upload(request: Request, exc: UploadError):
        return _error(exc.status, str(exc), limit=exc.limit,
                      field=exc.field if exc.status < 500 else None)  # fmt: skip

    @app.exception_handler(FieldError)
    async def _field(request: Request, exc: FieldError):
        return _error(422, str(exc), field=exc.field)

    @app.exception_handler(PartError)
    async def _part(request: Request, exc: PartError):
        return _error(422, str(exc), field="part")

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):  # nobody reads it: the client left
        return _error(499, str(exc), limit="client_closed")

    @app.exception_handler(AurlError)
    async def _aurl(request: Request, exc: AurlError):
        return _error(422, str(exc))

    # -- authentication and body size ---------------------------------------------------------

    # A plain ASGI middleware, not @app.middleware("http"): Starlette's BaseHTTPMiddleware
    # wraps ``receive`` so that Request.is_disconnected() never sees the client leave, and
    # the handlers stop work for clients that went away.
    def guard(request: Request) -> Response | None:
        if s.token and not _authorized(request.headers, request.cookies, s.token):
            path = request.url.path
            if path == "/login" or path.startswith("/static/"):
                return None
            if request.method == "GET" and not path.startswith("/api"):
                return HTMLResponse(_login_page(), status_code=401)
            return _error(401, "missing or wrong bearer token: send 'Authorization: Bearer "
                          "$AURL_TOKEN'", limit="token")  # fmt: skip
        if request.method in ("POST", "PUT", "PATCH"):
            most = lim.max_upload_bytes * 4 // 3 + MAX_FIELD_BYTES  # base64 or multipart
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "send a Content-Length header with the body",
                              limit="max_upload_bytes")  # fmt: skip
            # ASCII digits: '²'.isdigit() is True and int('²') raises (h11 refuses such a
            # header before the app, a laxer ASGI server might not)
            if not (length.isascii() and length.isdigit()) or int(length) > most:
                return _error(413, f"the body is {length} bytes, over this server's limit "
                              f"max_upload_bytes={lim.max_upload_bytes} for a MIDI file",
                              limit="max_upload_bytes")  # fmt: skip
        return None

    app.add_middleware(_Guard, check=guard)

    @app.post("/login", include_in_schema=False)
    async def login(token: str = Form(..., max_length=4096)):
        if not s.token or not hmac.compare_digest(token.encode(), s.token.encode()):
            return HTMLResponse(_login_page("wrong token"), status_code=401)
        r = RedirectResponse("/", status_code=303)
        r.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return r

    # -- pages ---------------------------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def studio():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(_api_docs(app.openapi()))

    @app.get("/listen", include_in_schema=False)
    async def listen_page():
        return FileResponse(STATIC / "listen.html")

    @app.get("/listen/results", include_in_schema=False)
    async def listen_results_page():
        return HTMLResponse(listen.results_html(listen.results(store)))

    # -- API -----------------------------------------------------------------------------------

    @app.get("/api/health", response_model=Health, tags=["info"])
    async def health():
        """Status, the models served (the first is the default) and the vocabulary size."""
        details = []
        for name, srv in servers.items():
            st = srv.stats()
            details.append(HealthModel(
                name=name, vocab_size=srv.vocab.size, mode=srv.model.config.mode,
                parameters=sum(p.numel() for p in srv.model.parameters()),
                active=st["active"], waiting=st["waiting"], slots=st["slots"],
                composing=st["composing"], styles=list(srv.model.config.styles),
                voices=voices.get(name, 0),
            ))  # fmt: skip
        first = next(iter(servers.values()))
        return Health(status="ok", models=list(servers), vocab_size=first.vocab.size,
                      details=details, limits=dataclasses.asdict(lim))  # fmt: skip

    async def request_config(opts: GenerateOptions, clock: Clock):
        """The server, GenerationConfig and primer ids of a request, checked."""
        srv = _server(servers, opts.model)
        primer = None
        if opts.primer:
            data = _b64(opts.primer, lim)
            try:
                result = await clock.parse(
                    data, "ids", name="primer",
                    options={"vocab": dataclasses.asdict(srv.model.vocab_config),
                             "polyphony_cap": opts.polyphony},
                )  # fmt: skip
            except UploadError as e:  # the JSON body has no field "file"
                e.field = "primer"
                raise
            primer = _primer_ids(np.asarray(result["ids"], dtype=np.int64), srv, opts)
        return srv, _generation_config(opts, srv, lim, primer), primer

    async def start_job(opts: GenerateOptions):
        if opts.cadence != "off":
            raise FieldError(
                f"cadence {opts.cadence!r}: the search redraws phrases and endings a stream has "
                "already sent; use POST /api/generate, or cadence 'off'", field="cadence",
            )  # fmt: skip
        clock = Clock(lim)
        srv, config, primer = await request_config(opts, clock)
        return srv, srv.submit(config, primer, deadline=clock.deadline), clock

    @app.post(
        "/api/generate", tags=["compose"], responses={**ERRORS, 200: {
            "content": {"audio/midi": {}, MUSICXML: {}},
            "description": "the piece as a MIDI file (or MusicXML)"}},
    )  # fmt: skip
    async def generate(opts: GenerateOptions, request: Request):
        """Compose one piece; returns it as a MIDI file, or MusicXML with ``format``
        (header ``X-Aurl-Tokens``: its length in tokens). With ``cadence`` (and ``seconds``)
        the piece comes from ``aurl generate --cadence``'s search, outside the shared batch."""
        if opts.cadence != "off":
            return await _generate_with_cadence(opts, request)
        srv, job, clock = await start_job(opts)
        ids = await _until_done_or_gone(job, request)
        midi = await asyncio.to_thread(srv.piece_midi, ids, job.config.voices, job.config.meter)
        return await _reply(midi, opts.format, f"aurl_seed{opts.seed}", clock, request, headers={
            "X-Aurl-Tokens": str(len(ids) - job.row.primer_length)})  # fmt: skip

    async def _generate_with_cadence(opts: GenerateOptions, request: Request):
        """``aurl generate --seconds S --cadence MODE`` on the served model, in a worker thread
        as a composition (:func:`_compose`): the phrase search decodes a piece's particles as
        rows of one batch and resamples them, and the ending search redraws a finished piece's
        tail, neither of which one row of the shared batch can do (docs/design.md)."""
        if opts.seconds is None:
            raise FieldError(
                f"cadence {opts.cadence!r} searches a piece of a length in seconds: give "
                "seconds, or cadence 'off'", field="cadence",
            )  # fmt: skip
        clock = Clock(lim)
        srv, config, primer = await request_config(opts, clock)
        tokens: list[int] = []

        def run(model: Any, progress: Any) -> Any:
            from aurl.generation.cadence import CADENCE_MODES, generate_with_cadence

            (piece,) = generate_with_cadence(
                model, config, primer=primer, options=CADENCE_MODES[opts.cadence],
                progress=progress,
            )  # fmt: skip
            tokens.append(len(piece.generated))
            return srv.piece_score(piece.ids, config.voices, config.meter)

        midi = await _compose(srv, run, clock, request, composing=False)
        return await _reply(midi, opts.format, f"aurl_seed{opts.seed}", clock, request,
                            headers={"X-Aurl-Tokens": str(tokens[0])})  # fmt: skip

    @app.websocket("/api/generate/stream")
    async def stream(ws: WebSocket):
        """First message: GenerateOptions as JSON. Then one ``{"type": "note", "pitch",
        "start", "end", "velocity"}`` (seconds) per decoded note, and ``{"type": "done",
        "tokens", "notes", "midi"}`` (base64 MIDI). Errors: ``{"type": "error", "error",
        "limit", "status"}`` and a close code 4000 + the HTTP status. Closing the socket
        cancels the work."""
        if s.token and not _authorized(ws.headers, ws.cookies, s.token):
            await ws.close(code=4401)
            return
        await ws.accept()
        try:
            opts = await _first_options(ws)
            srv, job, _ = await start_job(opts)
        except WebSocketDisconnect:
            return
        except (asyncio.TimeoutError, ValidationError, AurlError) as e:
            await _ws_error(ws, e)
            return
        await _stream_job(ws, srv, job)

    @app.post("/api/analyze", tags=["analysis"], responses=ERRORS)
    async def analyze(
        request: Request,
        file: Annotated[UploadFile, File(description="a MIDI file")],
        beats_per_bar: float = Form(0.0, ge=0, le=64, description="0: from the file's meter"),
    ) -> dict[str, Any]:
        """Keys, chords, cadences, form and melody of the file (``aurl analyze``'s JSON)."""
        await _only_fields(request, "file", "beats_per_bar")
        if 0 < beats_per_bar < MIN_BAR:  # 1e-9 asked the parser for 268 GiB of key windows
            raise FieldError(
                f"beats_per_bar {beats_per_bar:g}: give 0 (the file's meter) or {MIN_BAR} to 64",
                field="beats_per_bar",
            )
        clock = Clock(lim)
        data = await _read_upload(file, lim)
        return await clock.parse(
            data, "analyze", name=file.filename or "file",
            options={"beats_per_bar": beats_per_bar, "name": file.filename or ""},
        )  # fmt: skip

    @app.post("/api/notes", tags=["analysis"], responses=ERRORS)
    async def notes(
        request: Request, file: Annotated[UploadFile, File(description="a MIDI file")]
    ) -> dict[str, Any]:
        """The file's notes as ``[pitch, start, end, velocity]`` rows in seconds (what the
        studio draws), the bar length in beats, and its tracks' names (what the composing
        endpoints' ``part`` takes)."""
        await _only_fields(request, "file")
        clock = Clock(lim)
        data = await _read_upload(file, lim)
        result = await clock.parse(data, "notes", name=file.filename or "file")
        n = result["notes"]
        rows = [[p, round(o, 4), round(o + d, 4), v] for p, o, d, v in
                zip(n["pitch"], n["onset_s"], n["duration_s"], n["velocity"])]  # fmt: skip
        beats = [round(x, 4) for x in n["onset"]]
        return {"notes": rows, "onset_beats": beats, "beats_per_bar": result["beats_per_bar"],
                "tracks": result["tracks"]}  # fmt: skip

    @app.post("/api/harmonize", tags=["compose"], responses={**ERRORS, 200: {
        "content": {"audio/midi": {}, MUSICXML: {}}, "description": "the harmonization"}})  # fmt: skip
    async def harmonize(
        request: Request,
        file: Annotated[UploadFile, File(description="a MIDI file: a melody, or its top track")],
        model: str | None = Form(None, max_length=100),
        seed: int = Form(0, ge=0, le=2**63 - 1),
        key: str = Form("", max_length=40, description="favour this key, e.g. 'G major'"),
        voices: int = Form(4, ge=2, le=4, description="voices in all, melody included"),
        particles: int = Form(1, ge=1, le=16, description=PARTICLES_HELP),
        format: Literal["midi", "musicxml"] = Form("midi", description=FORMAT_HELP),
    ):
        """Compose lower voices under the uploaded melody (``aurl harmonize``): the melody is
        kept note for note on the Soprano track. A client that goes away stops the work."""
        await _only_fields(request, "file", "model", "seed", "key", "voices", "particles",
                           "format")  # fmt: skip
        from aurl.errors import ConstraintError
        from aurl.generation import compose

        clock = Clock(lim)
        srv = _server(servers, model)
        if key:
            _check_key(key)
        data = await _read_upload(file, lim)
        tracks, times = await _upload_piece(data, file.filename, clock)
        name, notes = compose.top_track(tracks)
        try:  # no notes, drums only, chords, a range the voices cannot go under: the file's
            line = compose.melody_line(notes, name=f"{file.filename or 'file'} ({name})")
        except ConstraintError as e:
            return _error(422, str(e), field="file")
        opts = compose.ComposeOptions(seed=seed, key=key, particles=particles)

        def run(m: Any, progress: Any) -> Any:
            (c,) = compose.harmonize(m, line, voices=voices, options=opts, qpm=times.first_qpm,
                                     like=times.like_score(), progress=progress,
                                     meter=times.meter)  # fmt: skip
            return c.score

        midi = await _compose(srv, run, clock, request)
        return await _reply(midi, format, "harmonized", clock, request)

    @app.post("/api/accompany", tags=["compose"], responses={**ERRORS, 200: {
        "content": {"audio/midi": {}, MUSICXML: {}}, "description": "the part and its voices"}})  # fmt: skip
    async def accompany(
        request: Request,
        file: Annotated[UploadFile, File(description="a MIDI file: the part (every track of it)")],
        model: str | None = Form(None, max_length=100),
        seed: int = Form(0, ge=0, le=2**63 - 1),
        voices: int = Form(4, ge=2, le=4, description="voices in all, the part included"),
        particles: int = Form(1, ge=1, le=16, description=PARTICLES_HELP),
        format: Literal["midi", "musicxml"] = Form("midi", description=FORMAT_HELP),
    ):
        """Compose the other voices around the uploaded part, above and below it (``aurl
        accompany``): the part is kept note for note on its own track. A client that goes away
        stops the work."""
        await _only_fields(request, "file", "model", "seed", "voices", "particles", "format")
        from aurl.errors import ConstraintError
        from aurl.generation import compose

        clock = Clock(lim)
        srv = _server(servers, model)
        data = await _read_upload(file, lim)
        tracks, times = await _upload_piece(data, file.filename, clock)
        try:
            notes, part = compose.part_of(tracks, file.filename or "file")
        except ConstraintError as e:
            return _error(422, str(e), field="file")
        opts = compose.ComposeOptions(seed=seed, particles=particles)

        def run(m: Any, progress: Any) -> Any:
            (c,) = compose.accompany(m, notes, voices=voices, part_name=part, options=opts,
                                     qpm=times.first_qpm, like=times.like_score(),
                                     meter=times.meter, progress=progress)  # fmt: skip
            return c.score

        midi = await _compose(srv, run, clock, request)
        return await _reply(midi, format, "accompanied", clock, request)

    @app.post("/api/infill", tags=["compose"], responses={**ERRORS, 200: {
        "content": {"audio/midi": {}, MUSICXML: {}}, "description": "the piece with new bars"}})  # fmt: skip
    async def infill(
        request: Request,
        file: Annotated[UploadFile, File(description="a MIDI file")],
        bars: str | None = Form(None, pattern=r"^\d{1,5}-\d{1,5}$", description="A-B, 1-based"),
        span: str | None = Form(
            None,
            pattern=r"^\d{1,5}(\.\d{1,3})?-\d{1,5}(\.\d{1,3})?$",
            description="S-T in seconds (instead of bars)",
        ),
        model: str | None = Form(None, max_length=100),
        seed: int = Form(0, ge=0, le=2**63 - 1),
        particles: int = Form(1, ge=1, le=16, description=PARTICLES_HELP),
        part: str | None = Form(
            None,
            max_length=100,
            description="regenerate only this track: its name or its 0-based index (as "
            "`aurl infill --part`); default: every track",
        ),
        format: Literal["midi", "musicxml"] = Form("midi", description=FORMAT_HELP),
    ):
        """Regenerate bars A..B (or the span S..T seconds) of the uploaded piece, keeping every
        note outside it (``aurl infill``); with ``part``, only that track's notes there. A
        client that goes away stops the work."""
        from aurl.data.notes import DRUM_PROGRAM, pitched

        await _only_fields(request, "file", "bars", "span", "model", "seed", "particles", "part",
                           "format")  # fmt: skip
        from aurl.generation import compose

        if (bars is None) == (span is None):
            return _error(422, "give bars A-B or span S-T (seconds), one of them", field="bars")
        clock = Clock(lim)
        srv = _server(servers, model)
        data = await _read_upload(file, lim)
        tracks, times = await _upload_piece(data, file.filename, clock)
        notes, owner = compose.piece_notes(tracks)
        if len(pitched(notes)) == 0:
            what = "drums only" if len(notes) else "no notes"
            return _error(422, f"{file.filename or 'file'} has {what}: nothing to infill around",
                          field="file")  # fmt: skip
        try:
            if bars is not None:
                a, b = (int(x) for x in bars.split("-"))
                end = float((notes["onset"] + notes["duration"]).max())
                where = times.bar_span(a, b, end, name=file.filename or "file", field="bars")
            else:
                s, t = (float(x) for x in span.split("-"))
                end_s = float((notes["onset_s"] + notes["duration_s"]).max())
                where = times.seconds_span(s, t, end_s, field="span")
        except ConfigError as e:
            return _error(422, str(e), field="bars" if bars is not None else "span")
        index = None if part is None else _part_index(part, tracks, file.filename or "file")
        if index is not None and not len(pitched(tracks[index][1])):  # as `aurl infill --part`
            # (its new pitched notes went onto the drum track, which lost its drum flag)
            pitched_tracks = ", ".join(f"{i}:{n}" for i, (n, x) in enumerate(tracks)
                                       if len(pitched(x)))  # fmt: skip
            raise PartError(f"part {part!r} is a drum track: choose a pitched part to infill "
                            f"({pitched_tracks})")  # fmt: skip
        # infill() takes the part as a mask over the pitched notes (it sets drums aside)
        chosen = None if index is None else (owner == index)[notes["program"] != DRUM_PROGRAM]
        opts = compose.ComposeOptions(seed=seed, particles=particles)

        def run(m: Any, progress: Any) -> Any:
            (c,) = compose.infill(m, notes, where, chosen, options=opts, qpm=times.first_qpm,
                                  progress=progress, meter=times.meter)  # fmt: skip
            return compose.infill_score(tracks, where, c.notes, part=index,
                                        like=times.like_score())  # fmt: skip

        midi = await _compose(srv, run, clock, request)
        return await _reply(midi, format, "infilled", clock, request)

    @app.post("/api/musicxml", tags=["compose"], responses={**ERRORS, 200: {
        "content": {MUSICXML: {}}, "description": "the file as MusicXML"}})  # fmt: skip
    async def musicxml(
        request: Request, file: Annotated[UploadFile, File(description="a MIDI file")]
    ):
        """The uploaded MIDI file as MusicXML (onsets and durations on a sixteenth-note grid,
        one part per track): the studio's MusicXML download of what is on the roll."""
        await _only_fields(request, "file")
        clock = Clock(lim)
        data = await _read_upload(file, lim)
        stem = Path(file.filename or "piece").stem[:60] or "piece"
        return await _reply(data, "musicxml", stem, clock, None, name=file.filename or "file")

    # -- listening test -------------------------------------------------------------------------

    @app.post("/api/listen/trial", tags=["listening test"], responses=ERRORS)
    async def trial(req: TrialRequest | None = None) -> dict[str, Any]:
        """A new blind trial: two excerpts ``a`` and ``b`` (``[pitch, onset, duration]`` in
        beats), one a held-out chorale, one composed now; play both at ``bpm``."""
        srv = _server(servers, req.model if req else None)
        return await _make_trial(srv, store, lim)

    @app.post("/api/listen/answer", tags=["listening test"], responses=ERRORS)
    async def answer(a: Answer, request: Request) -> dict[str, Any]:
        """Record which side the listener thinks is Bach; the reply says which one was."""
        listener = request.headers.get("x-listener", "")[:64] or "anonymous"
        try:
            return store.answer(a.trial, a.choice, listener)
        except listen.TrialError as e:
            return _error(e.status, str(e), field="trial")

    @app.get("/api/listen/results", tags=["listening test"])
    async def listen_results() -> list[dict[str, Any]]:
        """Per model: answers, correct, accuracy and its exact 95% interval."""
        return listen.results(store)

    return app


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _version() -> str:
    from aurl import __version__

    return __version__


def _schema_rows(schema: dict[str, Any], spec: dict[str, Any]) -> str:
    """Table rows for an object schema's properties (resolving one ``$ref``)."""
    from html import escape

    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    rows = []
    for name, p in schema.get("properties", {}).items():
        kinds = [x.get("type", "") for x in p.get("anyOf", [p])]
        bounds = ", ".join(f"{k} {p[k]}" for k in ("minimum", "maximum", "exclusiveMinimum",
                                                    "exclusiveMaximum", "maxLength") if k in p)  # fmt: skip
        rows.append(
            f"<tr><td><code>{escape(name)}</code></td><td>{escape(' | '.join(filter(None, kinds)))}"
            f"</td><td>{escape(str(p.get('default', '')))}</td><td>{escape(bounds)}</td>"
            f"<td>{escape(p.get('description', ''))}</td></tr>"
        )
    return "".join(rows)


def _api_docs(spec: dict[str, Any]) -> str:
    """The OpenAPI description as one plain HTML page (no scripts, nothing off the host)."""
    from html import escape

    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Aurl API</title>'
        '<link rel="stylesheet" href="/static/style.css"></head><body>'
        '<header><a href="/">Studio</a><a href="/listen">Listening test</a>'
        '<a href="/openapi.json">openapi.json</a></header><main>'
        f"<h1>{escape(spec['info']['title'])} API {escape(spec['info']['version'])}</h1>"
        f"<p>{escape(spec['info'].get('description', ''))}</p>"
        "<p><code>WS /api/generate/stream</code>: send the GenerateOptions below as one JSON "
        'message; receive <code>{"type": "note", "pitch", "start", "end", "velocity"}</code> '
        'per note (seconds), then <code>{"type": "done", "tokens", "notes", "midi"}</code>; '
        "closing the socket cancels the work. See docs/serve.md.</p>"
    ]
    head = "<tr><th>field</th><th>type</th><th>default</th><th>range</th><th>meaning</th></tr>"
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{method.upper()} {escape(path)}</code></h2>"
                         f"<p>{escape(op.get('description') or op.get('summary', ''))}</p>")  # fmt: skip
            body = op.get("requestBody", {}).get("content", {})
            for kind, content in body.items():
                rows = _schema_rows(content.get("schema", {}), spec)
                if rows:
                    parts.append(f"<p>{escape(kind)}</p><table>{head}{rows}</table>")
            codes = ", ".join(f"{c} {escape(r.get('description', ''))}"
                              for c, r in op.get("responses", {}).items())  # fmt: skip
            parts.append(f"<p>responses: {codes}</p>")
    parts.append("</main></body></html>")
    return "".join(parts)


def _authorized(headers: Any, cookies: dict[str, str], token: str) -> bool:
    given = headers.get("authorization", "")
    bearer = given.lower().startswith("bearer ")
    given = given[7:].strip() if bearer else cookies.get(COOKIE, "")
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def _login_page(note: str = "") -> str:
    msg = f"<p class='error'>{note}</p>" if note else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Aurl: sign in</title>'
        '<link rel="stylesheet" href="/static/style.css"></head><body><main>'
        f"<h1>Aurl</h1>{msg}<form method='post' action='/login'><label>Token "
        "<input type='password' name='token' autofocus></label> <button>Sign in</button>"
        "</form></main></body></html>"
    )


def _first_field(errors: Any) -> str | None:
    for e in errors:
        if e.get("type") == "json_invalid":  # its loc is ("body", character offset)
            return "body"
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "form")]
        if loc:
            return ".".join(loc)
        if tuple(e.get("loc", ())) == ("body",):  # the body as a whole: not an object, absent
            return "body"
    return None


def _validation_message(errors: Any) -> str:
    parts = []
    for e in list(errors)[:5]:
        if e.get("type") == "json_invalid":
            at = e.get("loc", ("body", "?"))[-1]
            parts.append(f"body: not valid JSON (at character {at}): send a JSON object")
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "form"))
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {str(got)[:40]!r})"
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)


def _server(servers: dict[str, ModelServer], name: str | None) -> ModelServer:
    if name is None:
        return next(iter(servers.values()))
    if name not in servers:
        raise FieldError(
            f"model {name!r} is not served here: choose one of {', '.join(servers)}", field="model"
        )
    return servers[name]


def _b64(text: str, lim: Limits) -> bytes:
    too_big = LimitError(f"primer is over max_upload_bytes={lim.max_upload_bytes}",
                         limit="max_upload_bytes", status=413, field="primer")  # fmt: skip
    if len(text) > lim.max_upload_bytes * 4 // 3 + 4:
        raise too_big
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(
            "primer: not base64 (send the MIDI file's bytes base64-encoded)", field="primer"
        ) from None
    if len(data) > lim.max_upload_bytes:
        raise too_big
    return data


async def _read_upload(file: UploadFile, lim: Limits) -> bytes:
    data = await file.read(lim.max_upload_bytes + 1)
    if len(data) > lim.max_upload_bytes:
        raise LimitError(f"{file.filename or 'file'} is over max_upload_bytes="
                         f"{lim.max_upload_bytes}", limit="max_upload_bytes", status=413)  # fmt: skip
    return data


async def _upload_piece(data: bytes, name: str | None, clock: Clock) -> tuple[list, Any]:
    """The upload's ``(name, notes)`` tracks and its time map, parsed in the worker process."""
    from aurl.data.notes import NOTE_DTYPE
    from aurl.generation.compose import TimeMap

    result = await clock.parse(data, "piece", name=name or "file")
    tracks = []
    for t in result["tracks"]:
        cols = t["notes"]
        notes = np.zeros(len(cols["pitch"]), dtype=NOTE_DTYPE)
        for field in NOTE_DTYPE.names:
            notes[field] = cols[field]
        tracks.append((str(t["name"]), notes))
    return tracks, TimeMap.from_json(result["time_map"])


def _generation_config(
    opts: GenerateOptions, srv: ModelServer, lim: Limits, primer: np.ndarray | None
):
    """The GenerationConfig of a request, checked against the server's limits (never clamped)."""
    from aurl.config import GenerationConfig, build

    if opts.max_tokens is not None and opts.seconds is not None:
        raise FieldError("give max_tokens or seconds, not both", field="seconds")
    if opts.max_tokens is not None and opts.max_tokens > lim.max_tokens:
        raise LimitError(f"max_tokens {opts.max_tokens} is over this server's limit "
                         f"max_tokens={lim.max_tokens}", limit="max_tokens", status=422,
                         field="max_tokens")  # fmt: skip
    if opts.seconds is not None and opts.seconds > lim.max_seconds:
        raise LimitError(f"seconds {opts.seconds:g} is over this server's limit "
                         f"max_seconds={lim.max_seconds:g}", limit="max_seconds", status=422,
                         field="seconds")  # fmt: skip
    values: dict[str, Any] = {
        "seed": opts.seed, "temperature": opts.temperature, "top_k": opts.top_k,
        "top_p": opts.top_p, "min_p": opts.min_p, "repetition_penalty": opts.repetition_penalty,
        "key": opts.key, "key_strictness": opts.key_strictness, "pitch_low": opts.pitch_low,
        "pitch_high": opts.pitch_high, "density": opts.density, "polyphony_cap": opts.polyphony,
        "min_tokens": opts.min_tokens, "style": opts.style, "voice_leading": opts.voice_leading,
        "voices": opts.voices, "spacing": opts.spacing, "ranges": opts.ranges,
    }  # fmt: skip
    if opts.max_tokens is not None:
        values["max_tokens"] = opts.max_tokens
    if opts.seconds is not None:
        values["seconds"], values["max_tokens"] = opts.seconds, lim.max_tokens
    if opts.tempo is not None:
        values["tempo"] = opts.tempo
    if opts.tempo_range is not None:
        values["tempo_range"] = opts.tempo_range
    if opts.instruments:
        values["instruments"] = opts.instruments
    if opts.key.strip().lower() == "primer":
        values["key"] = _primer_key(primer, srv)
    try:
        config = build(GenerationConfig, values, prefix="generation")
    except ConfigError as e:  # name the request's field, as pydantic's own errors do
        name = str(e).split(":", 1)[0].removeprefix("generation.")
        name = {"polyphony_cap": "polyphony"}.get(name, name)
        if name in GenerateOptions.model_fields:
            raise FieldError(str(e), field=name) from None
        raise
    _check_constraints(config, srv, opts)
    return config


def _check_constraints(config: Any, srv: ModelServer, opts: GenerateOptions) -> None:
    """The sampler's constraints built once here, each naming its request field (they were a
    422 with no field, found when the job started: session 10's sweep)."""
    from aurl.errors import ConstraintError
    from aurl.generation import constraints as c

    vocab = srv.vocab
    room = config.min_tokens <= config.max_tokens - c.MIN_TOKENS
    # the range names the bound the request gave (pitch_high alone under the default low once
    # named pitch_low)
    given = opts.model_fields_set & {"pitch_low", "pitch_high"}
    pitch_field = "pitch_high" if given == {"pitch_high"} else "pitch_low"
    steps = (
        (pitch_field, lambda: c.pitch_range_bias(vocab, config.pitch_low, config.pitch_high)),
        ("key", lambda: config.key and c.key_bias(vocab, config.key, config.key_strictness)),
        ("tempo_range" if opts.tempo_range is not None else "tempo",
         lambda: c.tempo_bias(vocab, config.tempo, config.tempo_range)),
        ("instruments", lambda: c.instrument_bias(vocab, config.instruments)),
        ("key" if room else "min_tokens", lambda: c.build_constraints(vocab, config)),
    )  # fmt: skip
    for field, step in steps:
        try:
            step()
        except ConstraintError as e:
            raise FieldError(str(e), field=field) from None
    if config.style:  # the style error the batcher would raise when the job starts
        from aurl.errors import ConfigError
        from aurl.style_ids import style_id

        try:
            style_id(tuple(srv.model.config.styles), config.style)
        except ConfigError as e:
            raise FieldError(str(e).removeprefix("--"), field="style") from None


def _primer_ids(ids: np.ndarray, srv: ModelServer, opts: GenerateOptions) -> np.ndarray:
    """A primer's ids as :func:`aurl.generation.generate.load_primer` makes them: no END or
    PAD, cut after ``primer_seconds``, and holding a note."""
    from aurl.data.vocab import END, PAD, Kind
    from aurl.generation.generate import token_seconds

    ids = ids[(ids != END) & (ids != PAD)]
    if opts.primer_seconds > 0:
        ids = ids[token_seconds(ids, srv.vocab) < opts.primer_seconds]
    if not (srv.vocab.kind[ids] == Kind.NOTE_ON).any():
        cut = f" in its first {opts.primer_seconds:g} s" if opts.primer_seconds > 0 else ""
        raise FieldError(f"primer has no notes{cut}: give a MIDI file with notes", field="primer")
    return ids


def _primer_key(primer: np.ndarray | None, srv: ModelServer) -> str:
    from aurl.analysis.keys import estimate_key
    from aurl.errors import DataError

    if primer is None:
        raise FieldError("key 'primer' needs a primer", field="key")
    try:
        notes = srv.tokenizer.decode_to_notes(primer)
        return estimate_key(notes, final_bass_weight=0.0).name
    except DataError as e:
        raise FieldError(f"key 'primer': {e}", field="key") from None


async def _until_done_or_gone(job: Any, request: Request) -> list[int]:
    """The job's ids; a client that goes away meanwhile cancels it (its slot is freed)."""
    task = asyncio.ensure_future(job.ids())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
    finally:
        job.cancel()  # a no-op once the job is done
        if not task.done():
            task.cancel()


async def _first_options(ws: WebSocket) -> GenerateOptions:
    """The stream's first message, a text or binary frame, as GenerateOptions. Pydantic's JSON
    parser reads it: json.loads raised out of the handler (no error message, no 4xxx close) on
    a binary frame, on arrays nested 100,000 deep (RecursionError) and on a 5,000-digit number
    (ValueError); here each is a 422 naming the body."""
    msg = await asyncio.wait_for(ws.receive(), timeout=30)
    if msg["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(msg.get("code", 1000))
    data = msg["text"] if msg.get("text") is not None else msg.get("bytes") or b""
    try:
        return GenerateOptions.model_validate_json(data)
    except ValidationError as e:
        bad = [x["msg"].removeprefix("Invalid JSON: ") for x in e.errors()
               if x["type"] == "json_invalid"]  # fmt: skip
        if bad:
            raise FieldError(f"the first message is not JSON ({bad[0]}): send the options as "
                             "a JSON object", field="body") from None  # fmt: skip
        raise


async def _ws_error(ws: WebSocket, e: Exception) -> None:
    status, limit = 422, None
    if isinstance(e, (LimitError, UploadError)):
        status, limit = e.status, e.limit
    if isinstance(e, asyncio.TimeoutError):
        message, status, limit = "no options within 30 s: send them first", 408, "options_seconds"
    elif isinstance(e, ValidationError):
        message = _validation_message(e.errors())
    else:
        message = str(e)
    try:
        await ws.send_json({"type": "error", "error": message, "limit": limit, "status": status})
        await ws.close(code=4000 + status)
    except (WebSocketDisconnect, RuntimeError):
        pass


async def _stream_job(ws: WebSocket, srv: ModelServer, job: Any) -> None:
    """Send the job's notes as they complete; cancel it when the client goes away."""
    from aurl.generation.batching import NoteStream

    async def watch() -> None:  # the client closing (or sending anything) cancels the work
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    notes = NoteStream(srv.vocab)
    sent = 0
    try:
        async for chunk in job.chunks():
            for token in chunk:
                for n in notes.feed(token):
                    await ws.send_json({"type": "note", **n})
                    sent += 1
        ids = np.asarray(job.row.ids)
        midi = await asyncio.to_thread(srv.piece_midi, ids, job.config.voices, job.config.meter)
        await ws.send_json({"type": "done", "tokens": int(len(ids) - job.row.primer_length),
                            "notes": sent, "midi": base64.b64encode(midi).decode()})  # fmt: skip
        await ws.close()
    except (WebSocketDisconnect, RuntimeError):
        job.cancel()
    except AurlError as e:
        await _ws_error(ws, e)
    finally:
        job.cancel()
        watcher.cancel()


class _Guard:
    """ASGI middleware: ``check(request)`` returns a response that stops an HTTP request
    (authentication, body size), or None to pass it on with ``receive`` untouched."""

    def __init__(self, app: Any, check: Any) -> None:
        self.app, self.check = app, check

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            stop = self.check(Request(scope))
            if stop is not None:
                await stop(scope, receive, send)
                return
        await self.app(scope, receive, send)


# the shortest bar /api/analyze takes, in quarter-note beats (as `aurl analyze`)
MIN_BAR = 0.25


class FieldError(ConfigError):
    """A form field the endpoint does not take."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


async def _only_fields(request: Request, *names: str) -> None:
    """Refuse form fields the endpoint does not take (a misspelt option is not ignored)."""
    form = await request.form()  # parsed once: FastAPI read this same form
    for key in form:
        if key not in names:
            raise FieldError(f"{key}: not a field of {request.url.path} (its fields: "
                             f"{', '.join(names)})", field=key)  # fmt: skip


class ClientGone(AurlError):
    """The client closed the connection before its reply was ready; the work was stopped."""


class Clock:
    """One request's time: ``request_seconds`` from the handler's start bound all of it (the
    upload's parsing, the wait for the composing slot, composing, a MusicXML reply), so no
    request outlives its limit by the time of a step that had a clock of its own."""

    def __init__(self, lim: Limits) -> None:
        self.lim = lim
        self.deadline = time.monotonic() + lim.request_seconds

    def over(self, what: str = "the request") -> LimitError:
        return LimitError(
            f"{what} took over request_seconds={self.lim.request_seconds:g} s: send a shorter "
            "piece, fewer particles, or retry when the server is less busy",
            limit="request_seconds", status=408,
        )  # fmt: skip

    def left(self) -> float:
        """Seconds left; raises the 408 when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.over()
        return left

    async def parse(
        self, data: bytes, task: str, *, name: str, options: dict | None = None, most: float = 0
    ) -> dict[str, Any]:
        """:func:`parse_upload` within ``parse_seconds`` (or ``most``) and the time left: a
        parse stopped by the request's time is its 408, not the file's fault."""
        cap = most or self.lim.parse_seconds
        left = self.left()
        try:
            return await parse_upload(data, task, name=name, options=options,
                                      timeout=min(cap, left), memory_mb=self.lim.parse_memory_mb)  # fmt: skip
        except UploadError as e:
            if e.limit == "parse_seconds" and left < cap:
                raise self.over() from None
            raise


async def _compose(
    srv: ModelServer, run: Any, clock: Clock, request: Request, *, composing: bool = True
) -> bytes:
    """``run(model, progress) -> score`` in a worker thread, one composition per model at a
    time, stopped (408) when the request passes ``request_seconds`` (waiting for the slot
    included), and stopped at the next token when the client goes away (checked every 0.25 s;
    the slot frees as soon as the worker stops); returns the score's MIDI bytes.
    ``composing``: the model must compose around given notes
    (:func:`aurl.generation.compose.composing_model`); not for a cadence search."""
    import threading

    from aurl.generation.compose import composing_model

    model = composing_model(srv.composer or srv.model) if composing else srv.model
    deadline = clock.deadline
    gone = threading.Event()

    def progress(items: Any, **_: Any) -> Any:  # checked once per token
        for item in items:
            if gone.is_set():
                raise ClientGone("the client went away: composing stopped")
            if time.monotonic() > deadline:
                raise clock.over("composing")
            yield item

    lock = _compose_lock(srv)
    try:
        await asyncio.wait_for(lock.acquire(), clock.left())
    except asyncio.TimeoutError:
        raise clock.over("waiting for the composing slot") from None
    try:
        if await request.is_disconnected():
            raise ClientGone("the client went away before composing began")
        srv.composing += 1
        work = asyncio.ensure_future(asyncio.to_thread(run, model, progress))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=0.25)
                if done:
                    score = work.result()
                    break
                if await request.is_disconnected():
                    gone.set()
        finally:
            gone.set()  # a no-op once the work is done; stops it when this handler is cancelled
            with contextlib.suppress(BaseException):
                await asyncio.shield(work)  # hold the slot until the worker has stopped
            srv.composing -= 1
    finally:
        lock.release()
    return await asyncio.to_thread(score.dumps_midi)


async def _reply(
    midi: bytes,
    fmt: str,
    stem: str,
    clock: Clock,
    request: Request | None,
    *,
    headers: dict[str, str] | None = None,
    name: str = "piece",
) -> Response:
    """``midi`` as the reply in ``fmt``: the bytes themselves, or MusicXML made from them in
    the parsing process (music21 never loads in the server)."""
    if fmt == "midi":
        disposition = _attachment(f"{stem}.mid")
        return Response(midi, media_type="audio/midi",
                        headers={**(headers or {}), "Content-Disposition": disposition})  # fmt: skip
    result = await clock.parse(midi, "musicxml", name=name, most=max(clock.lim.parse_seconds, 30))
    disposition = _attachment(f"{stem}.musicxml")
    return Response(result["musicxml"].encode("utf-8"), media_type=MUSICXML,
                    headers={**(headers or {}), "Content-Disposition": disposition})  # fmt: skip


def _attachment(name: str) -> str:
    """A Content-Disposition header for ``name`` (from the upload's file name, any text): an
    ASCII ``filename`` with no quote, backslash or control character, and the name itself as
    RFC 6266's ``filename*``. (The name as it came was a 500: a header is Latin-1, one line.)"""
    from urllib.parse import quote

    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name.encode('utf-8', 'replace'), safe='')}"


def _part_index(part: str, tracks: list, filename: str) -> int:
    """The track ``part`` names (its name, any case, or its 0-based index), as the CLI's
    ``--part``. Raises PartError (a 422 naming the field and the tracks) otherwise."""
    names = [n.lower() for n, _ in tracks]
    if part.strip().lower() in names:
        return names.index(part.strip().lower())
    index = part.strip()
    # ASCII digits only: str.isdigit() is also true of '²', which int() refuses (a 500)
    if index.isascii() and index.isdigit() and int(index) < len(tracks):
        return int(index)
    listed = ", ".join(f"{i}:{n}" for i, (n, _) in enumerate(tracks))
    raise PartError(f"part {part!r}: {filename} has no such track; its tracks are {listed}")


class PartError(ConfigError):
    """An infill ``part`` that names no track of the upload."""


def _compose_lock(srv: ModelServer) -> asyncio.Semaphore:
    lock = getattr(srv, "_compose_lock", None)
    if lock is None:
        lock = srv._compose_lock = asyncio.Semaphore(1)
    return lock


def _check_key(key: str) -> None:
    from aurl.analysis.keys import parse_key

    try:
        parse_key(key)
    except Exception as e:  # noqa: BLE001 - any parse failure is one clear line
        raise FieldError(f"key {key!r}: {e}", field="key") from None


async def _make_trial(srv: ModelServer, store: listen.Store, lim: Limits) -> dict[str, Any]:
    rng = random.SystemRandom()
    chorales = listen.test_chorales()
    chorale = rng.choice(chorales)
    bach = await asyncio.to_thread(listen.chorale_notes, chorale)
    seed = rng.randrange(2**31)
    from aurl.config import GenerationConfig

    config = GenerationConfig(max_tokens=min(lim.max_tokens, 400), seed=seed)  # > 4 bars
    job = srv.submit(config)
    try:
        ids = await job.ids()
    finally:
        job.cancel()
    aurl_notes = await asyncio.to_thread(srv.tokenizer.decode_to_notes, np.asarray(ids))
    beats = listen.excerpt_beats(bach, aurl_notes)
    bach_side = rng.choice("AB")
    pieces = {bach_side: listen.excerpt(bach, beats),
              "B" if bach_side == "A" else "A": listen.excerpt(aurl_notes, beats)}  # fmt: skip
    trial = store.add_trial(srv.name, chorale.source, bach_side, beats, seed)
    return {"trial": trial, "model": srv.name, "bpm": listen.TRIAL_BPM, "beats": beats,
            "velocity": listen.TRIAL_VELOCITY, "a": pieces["A"], "b": pieces["B"]}  # fmt: skip
