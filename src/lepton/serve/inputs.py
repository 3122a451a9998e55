"""Request bodies into decoded images: multipart uploads, raw file bodies, JSON with base64 files or nested
arrays. Small PNGs are decoded on the event loop, everything else in a thread."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import numpy as np
from fastapi import Request

from lepton.serve.adapters import ModelAdapter
from lepton.serve.errors import ApiError

#: Deepest nesting of arrays and objects a JSON body may have (an image as nested lists needs 4).
MAX_JSON_DEPTH = 32
#: Most values a JSON body may hold (commas + 1, counted before parsing): beyond it, send binary data instead.
MAX_JSON_VALUES = 2_000_000

#: PNG uploads up to this many pixels are decoded on the event loop: for a small image a thread hand-off (and
#: the GIL contention it brings) costs more than the decode itself (measured with benchmarks/serve_load.py).
#: Larger PNGs, other rasters, DICOM, NIfTI and NPY are decoded in a thread.
INLINE_DECODE_PIXELS = 256 * 256


def decodes_inline(data: bytes) -> bool:
    """A small PNG, judged from its IHDR chunk before any decoding, and no bigger on the wire than its
    pixels would be raw (a small image padded with megabytes of chunks goes to a thread)."""
    if not 24 <= len(data) <= 4 * INLINE_DECODE_PIXELS + 4096:
        return False
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width * height <= INLINE_DECODE_PIXELS


def _max_depth(body: bytes, chunk: int = 1 << 20) -> int:
    """The deepest bracket nesting in ``body`` (brackets inside strings count too: an upper bound), in chunks so a
    large body needs no large temporary arrays."""
    deepest = level = 0
    for start in range(0, len(body), chunk):
        a = np.frombuffer(body, np.uint8, count=min(chunk, len(body) - start), offset=start)
        steps = ((a == 91) | (a == 123)).astype(np.int32) - ((a == 93) | (a == 125)).astype(np.int32)
        running = np.cumsum(steps) + level
        deepest, level = max(deepest, int(running.max())), int(running[-1])
    return deepest


def parse_json(body: bytes, what: str = "body") -> Any:
    """``json.loads`` with its cost bounded before it starts: nesting depth and value count; ApiError 400 with
    the OIP/native error shape otherwise (never a RecursionError)."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _max_depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, "json_too_deep", f"{what} nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
    if body.count(b",") >= MAX_JSON_VALUES:
        raise ApiError(413, "payload_too_large", f"{what} holds more than {MAX_JSON_VALUES} JSON values; send "
                                                 "large tensors as binary data")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "json_too_deep", f"{what} nests arrays or objects too deeply") from None


async def decode_upload(adapter: ModelAdapter, data: bytes, filename: str | None) -> np.ndarray:
    """Decode an uploaded file with ``adapter``: small PNGs inline, everything else off the event loop."""
    if decodes_inline(data):
        return adapter.decode_request(data, filename)
    return await asyncio.to_thread(adapter.decode_request, data, filename)


def _holds_booleans(value: Any) -> bool:
    """Whether nested lists hold a JSON true/false (NumPy would silently take them as 1.0 and 0.0)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body; ApiError 413 over ``limit`` bytes, 400 when empty."""
    body = await request.body()
    if len(body) > limit:
        raise ApiError(413, "payload_too_large", f"request body over {limit} bytes")
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    return body


def _multipart_error(message: str) -> ApiError:
    return ApiError(400, "invalid_multipart", message)


def check_multipart(body: bytes, content_type: str) -> None:
    """ApiError 400 naming what is wrong with a multipart/form-data body's framing: no boundary parameter, a body
    whose delimiters are not the declared boundary, no closing delimiter, a part without headers. The parser would
    otherwise fail deep inside (a 500) or report a missing field."""
    from python_multipart.multipart import parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise _multipart_error("multipart/form-data needs a boundary parameter in Content-Type "
                               "(multipart/form-data; boundary=...)")
    dash = b"--" + boundary
    shown = boundary.decode("latin-1")
    if body.startswith(dash):
        start = len(dash)
    elif b"\r\n" + dash in body:
        start = body.index(b"\r\n" + dash) + 2 + len(dash)
    else:
        raise _multipart_error(f"the body has no delimiter --{shown}: Content-Type declares boundary={shown}, "
                               "and the body must use the same boundary")
    if body.startswith(b"--", start):  # the first delimiter closes the body: no parts
        return
    end = body.find(b"\r\n" + dash + b"--", start)
    if end < 0:
        raise _multipart_error(f"the body ends without its closing delimiter --{shown}--")
    for number, part in enumerate(body[start:end].split(b"\r\n" + dash), 1):
        head, blank, _ = part.partition(b"\r\n\r\n")
        if not blank or b"content-disposition:" not in head.lower():
            raise _multipart_error(f"part {number} has no headers: each part needs a Content-Disposition header "
                                   "and a blank line before its content")


async def read_form(request: Request, limit: int):
    """The parsed multipart form of a body within ``limit``; ApiError 400 for malformed framing or parts."""
    from python_multipart.exceptions import FormParserError
    from starlette.exceptions import HTTPException

    body = await read_body(request, limit)
    check_multipart(body, request.headers.get("content-type", ""))
    try:
        return await request.form()
    except (FormParserError, HTTPException) as exc:
        raise _multipart_error(f"malformed multipart body: {getattr(exc, 'detail', None) or exc}") from None


async def request_covariates(request: Request) -> dict[str, Any] | None:
    """A native predict request's clinical covariates, by name: the multipart field ``covariates`` (a JSON object as
    text) or the JSON body's ``covariates`` object; None when the request has none. Read after ``decode_request``
    (the body and form are parsed once and kept)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        text = (await request.form()).get("covariates")
        if text is None:
            return None
        if not isinstance(text, str):
            raise ApiError(422, "invalid_request", "'covariates' must be a form field with a JSON object, not a file")
        value = parse_json(text.encode(), "covariates")
    elif ctype.startswith("application/json"):
        value = parse_json(await request.body()).get("covariates")
        if value is None:
            return None
    else:
        return None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_request", "'covariates' must be a JSON object of values by name")
    return value


async def decode_request(request: Request, adapter: ModelAdapter, limit: int) -> np.ndarray:
    """One image from a native predict request, by content type: multipart ``file``, JSON ``image``
    (base64 file) or ``array`` (nested list in [0, 1]), or the raw file as the body."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await read_form(request, limit)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_file", "multipart requests need a 'file' field")
        data = await upload.read()
        if not data:
            raise ApiError(422, "empty_file", "the uploaded file is empty")
        return await decode_upload(adapter, data, upload.filename)
    body = await read_body(request, limit)
    if ctype.startswith("application/json"):
        payload = parse_json(body)
        if not isinstance(payload, dict) or not ({"image", "array"} & set(payload)):
            raise ApiError(422, "invalid_request", "JSON body needs 'image' (base64 file) or 'array' (nested list)")
        if "image" in payload:
            filename = payload.get("filename")
            if not isinstance(payload["image"], str) or not isinstance(filename, str | None):
                raise ApiError(422, "invalid_request", "'image' must be a base64 string and 'filename' a string")
            try:
                data = base64.b64decode(payload["image"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ApiError(422, "invalid_base64", f"'image' is not valid base64: {exc}") from exc
            return await decode_upload(adapter, data, filename)
        if (b"true" in body or b"false" in body) and _holds_booleans(payload["array"]):
            raise ApiError(422, "invalid_input", "array: values must be numbers in [0, 1], not true/false")
        return adapter.decode_array(payload["array"])
    return await decode_upload(adapter, body, request.headers.get("x-filename"))
