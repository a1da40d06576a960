"""The served OpenAPI document (/openapi.json), made to say what the server really answers.

FastAPI's generated document promises a 422 `{"detail": [...]}` for invalid input and nothing else;
this server never sends that shape (app.py answers every error in the API family's own shape, with
400, or 422 on TGI routes). `document(app)` replaces it, per operation, with the statuses the
server can give (400/422, 401, 409, 413, 429, 500, and 501 for llama.cpp's /infill) and the family's
error schema, and adds `text/event-stream` to the 200 of the routes that stream. Clients that
generate code from the document, and schema fuzzers (tests/server/test_fuzz.py), then see the truth.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
TGI_ERROR = {"type": "object", "required": ["error", "error_type"],
             "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
LLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message", "type"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "type": {"type": "string"}}}}}
SCHEMAS = {"openai": ("OpenAIError", OPENAI_ERROR), "tgi": ("TGIError", TGI_ERROR),
           "llamacpp": ("LlamaCppError", LLAMA_ERROR)}
STATUS_TEXT = {400: "Invalid request", 401: "Missing or wrong API key", 409: "Superseded by a newer request with "
               "the same X-Client-Id", 413: "Body too large", 422: "Invalid request", 429: "Overloaded",
               500: "Internal or generation error", 501: "Not supported by this model"}
# One server-sent event (OpenAPI before 3.2 describes each event, not the stream): `data` is JSON
# text in the route family's streaming shape, or OpenAI's closing "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
STREAMING = {"/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream", "/", "/models/{model_id}", "/completion", "/infill"}


def document(app: FastAPI, family) -> dict:
    """The OpenAPI document of `app`, built once; `family(path)` names a path's API family."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape: never sent
        components.pop(name, None)
    for path, operations in doc.get("paths", {}).items():
        kind = family(path)
        name, schema = SCHEMAS[kind]
        components[name] = schema
        statuses = [422 if kind == "tgi" else 400, 401, 409, 413, 429, 500] + ([501] if path == "/infill" else [])
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in statuses:
                responses[str(status)] = {"description": STATUS_TEXT[status], "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
            ok = responses.get("200", {})
            if path in STREAMING and "content" in ok:
                ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    app.openapi_schema = doc
    return doc
