"""OpenAPI 3.1 from the endpoint table and the msgspec models the handlers really use: never by hand."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from daemon import __version__
from daemon.errors import Problem
from daemon.routes import ENDPOINTS, Endpoint


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    status: int
    code: str
    message: str
    field: str | None = None
    problems: list[Problem] | None = None


class ErrorBody(msgspec.Struct):
    """The one shape of every error answer."""

    error: ErrorDetail
    accepted: dict[str, int | str | bool] | None = None


def build_spec() -> dict[str, Any]:
    types: list[Any] = [ErrorBody]
    for endpoint in ENDPOINTS:
        types += [t for t in (endpoint.body, *(r[1] for r in endpoint.responses.values())) if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "transcriptd",
            "version": __version__,
            "description": "Conversation webhooks answered in milliseconds, every message stored exactly once.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(endpoint: Endpoint, schema_of: dict[Any, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.operation_id,
        "tags": [endpoint.tag],
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", endpoint.path)
        ]
        + _query_parameters(endpoint.query),
        "responses": {},
    }
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema_of[endpoint.body]}},
        }
    if endpoint.bearer:
        operation["security"] = [{}, {"bearer": []}]  # bearer only when api.token is set
    for status, (description, type_) in endpoint.responses.items():
        answer: dict[str, Any] = {"description": description}
        if type_ is not None:
            answer["content"] = {"application/json": {"schema": schema_of[type_]}}
        operation["responses"][str(status)] = answer
    for status, description in endpoint.errors.items():
        operation["responses"][str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": schema_of[ErrorBody]}},
        }
    return operation


def _query_parameters(query: type | None) -> list[dict[str, Any]]:
    if query is None:
        return []
    (schema,), components = msgspec.json.schema_components([query], ref_template="#/components/schemas/{name}")
    struct = components[schema["$ref"].rsplit("/", 1)[1]]
    required = set(struct.get("required", []))
    parameters = []
    for name, prop in struct["properties"].items():
        description = prop.pop("description", None)
        parameter = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


class OpenAPI:
    def __init__(self) -> None:
        self._body = msgspec.json.encode(build_spec())

    async def serve(self, request: Request) -> Response:
        return Response(self._body, media_type="application/json")
