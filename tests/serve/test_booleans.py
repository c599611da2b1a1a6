"""JSON true / false is no number (session 8): every int or float field of every request body
and form of the app, and of the stream's first message, found by introspection of the routes
(a new field is covered as it is added), refuses a boolean with a 422 naming the field, where
pydantic's lax mode read ``{"temperature": true}`` as 1.0."""

from __future__ import annotations

import json
import typing

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel

from tests.serve.test_api import CHORALE, error_of
from tests.serve.test_bad_input import UPLOADS


def numeric(tp) -> bool:
    return tp in (int, float) or any(numeric(a) for a in typing.get_args(tp))


def body_models(tp) -> list[type[BaseModel]]:
    """The pydantic models in a body parameter's type (``TrialRequest | None``)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in body_models(a)]


def fields(app):
    """(path, kind, field name, annotation) of every int / float field a route reads from its
    body: 'json' (a model's field) or 'form'."""
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        for param in route.dependant.body_params:
            tp = param.field_info.annotation
            for model in body_models(tp):
                for name, f in model.model_fields.items():
                    if numeric(f.annotation):
                        yield route.path, "json", name, f.annotation
            if not body_models(tp) and numeric(tp):
                yield route.path, "form", param.alias, tp


def test_every_numeric_field_refuses_true_and_false_naming_it(client):
    found = list(fields(client.app))
    json_fields = [f for f in found if f[1] == "json"]
    assert len(json_fields) >= 17 and ("/api/harmonize", "form", "seed", int) in found
    for path, kind, name, tp in found:
        for value in (True, False):
            if kind == "json":
                item = [value, value] if typing.get_origin(tp) is list else value
                r = client.post(path, json={name: item})
            else:  # a form: the words a browser would send
                r = client.post(path, files={"file": ("c.mid", CHORALE.read_bytes())},
                                data={**UPLOADS[path], name: json.dumps(value)})  # fmt: skip
            msg = error_of(r, 422, field=name)
            said = "expected a number, got true or false" if kind == "json" else str(value).lower()
            assert msg.startswith(f"{name}: ") and said in msg, (path, name, msg)
    assert client.get("/api/health").status_code == 200


@pytest.mark.parametrize("name", ["temperature", "seed", "tempo_range"])
def test_the_stream_refuses_a_boolean_naming_the_field(client, name):
    value = [True, 120] if name == "tempo_range" else True
    with client.websocket_connect("/api/generate/stream") as ws:
        ws.send_text(json.dumps({"max_tokens": 16, name: value}))
        m = ws.receive_json()
    assert m["type"] == "error" and m["status"] == 422
    assert m["error"].startswith(f"{name}: expected a number, got true or false"), m
