"""Open Inference Protocol v2 tensors on the wire: JSON ``data``, and the binary tensor data extension (Triton,
KServe) — a JSON header of ``Inference-Header-Content-Length`` bytes followed by each binary tensor's bytes
(little-endian, row-major; a BYTES element is a 4-byte little-endian length and its bytes), marked by the
``binary_data_size`` parameter. Requests ask for binary outputs with ``binary_data_output`` (all) or an
output's ``binary_data``. Every size is checked before anything is allocated."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lepton.serve.errors import ApiError
from lepton.serve.inputs import parse_json

#: OIP datatypes with a fixed-size NumPy equivalent (BYTES is variable-length, handled apart).
NUMPY_TYPES: dict[str, type] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64,
}
DATATYPES = (*NUMPY_TYPES, "BYTES")
#: Header announcing the length of the JSON part of a body that carries binary tensors.
HEADER_LENGTH = "inference-header-content-length"


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


@dataclass
class InferRequest:
    """A parsed infer request: its id, input tensors by name (in request order), requested outputs, and
    whether outputs default to binary."""

    id: str | None
    inputs: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    outputs: list[dict[str, Any]] | None = None
    binary_output: bool = False


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be an object")
    return params


def _integer(value: Any) -> int | None:
    """``value`` as an int when JSON Schema calls it an integer: 3 and 3.0 (as Triton reads them), never true."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _shape(tensor: dict[str, Any], where: str) -> list[int]:
    shape = tensor.get("shape")
    dims = [_integer(d) for d in shape] if isinstance(shape, list) else []
    if not (dims and all(d is not None and d >= 0 for d in dims)):
        raise _bad(f"{where}: 'shape' must be a non-empty list of non-negative integers (got {shape!r})")
    return dims


def _bytes_elements(raw: memoryview, count: int, where: str) -> np.ndarray:
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise _bad(f"{where}: BYTES data ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise _bad(f"{where}: a BYTES element of {n} bytes runs past the tensor's binary_data_size")
        out.append(bytes(raw[offset:offset + n]))
        offset += n
    if offset != len(raw):
        raise _bad(f"{where}: {len(raw) - offset} bytes left over after {count} BYTES elements")
    return np.array(out, dtype=object)


@dataclass
class _Header:
    """A tensor's description, checked before any of its data is read."""

    name: str
    datatype: str
    shape: list[int]
    size: int | None  # binary_data_size, or None for JSON data
    where: str


def _header(tensor: Any, index: int) -> _Header:
    where = f"inputs[{index}]"
    if not isinstance(tensor, dict):
        raise _bad(f"{where} must be an object with name, datatype, shape and data")
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}: 'name' must be a non-empty string")
    where = f"input {name!r}"
    if datatype not in DATATYPES:
        raise _bad(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = _shape(tensor, where)
    raw_size = _parameters(tensor, where).get("binary_data_size")
    size = None if raw_size is None else _integer(raw_size)
    if raw_size is not None and (size is None or size < 0):
        raise _bad(f"{where}: binary_data_size must be a non-negative integer (got {raw_size!r})")
    if size is None and not isinstance(tensor.get("data"), list):
        raise _bad(f"{where}: needs 'data' (a list of values) or a binary_data_size parameter")
    if size is not None and "data" in tensor:
        raise _bad(f"{where}: has both 'data' and binary_data_size; send one")
    return _Header(name, datatype, shape, size, where)


def _tensor(tensor: dict[str, Any], head: _Header, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """The tensor's values (shape and limits already checked) and the offset after its binary data."""
    where, datatype, shape, size = head.where, head.datatype, head.shape, head.size
    count = math.prod(shape)
    if size is not None:
        if offset + size > len(binary):
            raise _bad(f"{where}: binary_data_size {size} runs past the body ({len(binary) - offset} binary bytes "
                       "left); check Inference-Header-Content-Length")
        raw = binary[offset:offset + size]
        if datatype == "BYTES":
            return _bytes_elements(raw, count, where).reshape(shape), offset + size
        dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
        if size != count * dtype.itemsize:
            raise _bad(f"{where}: binary_data_size {size} does not match shape {shape} of {datatype} "
                       f"({count * dtype.itemsize} bytes)")
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape), \
            offset + size
    data = tensor["data"]
    try:
        arr = np.array(data, dtype=object if datatype == "BYTES" else NUMPY_TYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"{where}: 'data' is not a list of {datatype} values ({exc})") from None
    if arr.size != count:
        raise _bad(f"{where}: 'data' holds {arr.size} values but shape {shape} needs {count}")
    if datatype == "BYTES":
        arr = np.array([v.encode() if isinstance(v, str) else v for v in arr.ravel()], dtype=object)
        if not all(isinstance(v, bytes) for v in arr):
            raise _bad(f"{where}: BYTES data must be strings")
    return arr.reshape(shape), offset


def parse_infer_request(body: bytes, header_length: str | None, *, max_elements: int,
                        expect: Callable[[str, str, list[int]], str | None] | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON plus binary tensors); ApiError 400/413 for anything malformed.
    ``expect(name, datatype, shape)`` names what the server cannot take in a tensor's header (an unknown input, a
    datatype or rank it does not serve), checked with the structure: 400 before any size limit (413)."""
    if header_length is not None:
        if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length!r} must be a number of bytes between 1 and "
                       f"the body's {len(body)}")
        split = int(header_length)
    else:
        split = len(body)
    payload = parse_json(body[:split], "the inference request")
    if not isinstance(payload, dict):
        raise _bad("the inference request must be a JSON object with 'inputs'")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    outputs = payload.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise _bad("'outputs' must be a list of objects with a 'name'")
    for output in outputs or []:
        if not isinstance(_parameters(output, f"output {output['name']!r}").get("binary_data", False), bool):
            raise _bad(f"output {output['name']!r}: binary_data must be true or false")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    binary_output = _parameters(payload, "the inference request").get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise _bad("binary_data_output must be true or false")
    binary = memoryview(body)[split:]
    request = InferRequest(request_id, outputs=outputs, binary_output=binary_output)
    heads = [_header(tensor, i) for i, tensor in enumerate(inputs)]  # every tensor's structure first (400) …
    for head in heads:
        why = expect(head.name, head.datatype, head.shape) if expect else None
        if why:
            raise _bad(f"{head.where}: {why}")
    names = [head.name for head in heads]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _bad(f"input {twice[0]!r} is given twice")
    for head in heads:  # … then the limits (413), before any data is decoded
        if math.prod(head.shape) > max_elements:
            raise ApiError(413, "payload_too_large", f"{head.where}: shape {head.shape} has more than "
                                                     f"{max_elements} elements")
    offset = 0
    for tensor, head in zip(inputs, heads, strict=True):
        arr, offset = _tensor(tensor, head, binary, offset)
        request.inputs[head.name] = (head.datatype, arr)
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes after the JSON header belong to no input's binary_data_size")
    return request


def _binary(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in arr.ravel():
            b = v.encode() if isinstance(v, str) else bytes(v)
            parts += [struct.pack("<I", len(b)), b]
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")).tobytes()


def encode_infer_response(header: dict[str, Any], tensors: dict[str, tuple[str, np.ndarray]],
                          request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers: JSON, or JSON plus binary outputs when any was asked for."""
    if request.outputs:
        unknown = [o["name"] for o in request.outputs if o["name"] not in tensors]
        if unknown:
            raise _bad(f"unknown output(s) {', '.join(map(repr, unknown))}; this model's outputs are "
                       f"{', '.join(tensors)}")
        chosen = [(o["name"], _parameters(o, f"output {o['name']!r}").get("binary_data", request.binary_output))
                  for o in request.outputs]
    else:
        chosen = [(name, request.binary_output) for name in tensors]
    described, blobs = [], []
    for name, as_binary in chosen:
        datatype, arr = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if as_binary is True:
            blob = _binary(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in arr.ravel().tolist()]
        described.append(entry)
    head = json.dumps({**header, "outputs": described}, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(head))}
