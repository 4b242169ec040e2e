"""What travels over the wire: request parsing with errors that name the field, and the answers.

Nothing here touches the network or the model: each function maps bytes or JSON to plain values, or
raises :class:`RequestError` carrying the HTTP status, an error kind (a metrics label) and a one-line
message.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from ..errors import HRNetError

PROBS_OUTPUT = "probabilities"
"""The v2 output: softmax probabilities, FP32 ``[batch, classes]``."""
IMAGE_INPUT, TENSOR_INPUT = "image", "input"
"""The v2 inputs, send exactly one: encoded images (BYTES, base64 in JSON) or the preprocessed FP32
``[batch, 3, H, W]`` tensor the model takes (resized, centre-cropped, normalised)."""


class RequestError(HRNetError):
    """A request the server refuses: ``status`` and ``kind`` (e.g. ``too_large``) go to the client
    and to the metrics; ``headers`` are added to the answer (``Retry-After``)."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


def bad_request(message: str) -> RequestError:
    return RequestError(400, "bad_request", message)


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """A ``multipart/form-data`` body (already read, so already bounded) → its file parts
    ``[(filename, bytes)]`` in order and its plain fields ``{name: text}``.

    Parsed in memory with python-multipart's streaming parser: Starlette's own form parser spools
    files over 1 MB to temporary files, and a server must leave none behind.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise bad_request("Content-Type: multipart/form-data without a boundary")
    parts: list[dict] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise bad_request(f"multipart body: more than {max_parts} parts")
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header[0].lower()] = header[1]
        header[:] = [b"", b""]

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": lambda data, start, end: parts[-1]["data"].append(data[start:end])}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise bad_request(f"malformed multipart body ({e})") from None
    files, fields = [], {}
    for i, part in enumerate(parts):
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(part["data"])
        if b"filename" in disp:
            files.append((disp[b"filename"].decode("utf-8", "replace") or name or f"part {i}", data))
        else:
            fields[name] = data.decode("utf-8", "replace")
    return files, fields


def parse_int(value: object, lo: int, hi: int, field: str) -> int:
    """An integer in lo..hi, from a query string, form field or JSON value."""
    try:
        k = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        k = None
    if k is None or not lo <= k <= hi:
        raise bad_request(f"{field}: expected an integer from {lo} to {hi}, got {value!r}")
    return k


def parse_top_k(value: object, num_classes: int, field: str = "top_k") -> int:
    """A top-k of at least 1; one beyond the class count is clamped to it (as Hugging Face's pipeline
    does), so a client asking every model for 5 also works with a 3-class one."""
    return min(parse_int(value, 1, 2**31, field), num_classes)


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON body may have (a v2 body needs 6)."""
MAX_NUMBER_CHARS = 64
"""Longest number literal in a JSON body (a float32 needs under 20 characters)."""
_STRUCTURE = re.compile(rb'["\[\]{}]')
_STRING_STOP = re.compile(rb'[\\"]')
_SCAN = 1 << 18  # bytes searched per regex call: the event loop gets the interpreter between calls


def _check_depth(body: bytes) -> None:
    """Refuse nesting beyond :data:`MAX_JSON_DEPTH` before parsing: Python's json has no depth limit
    of its own and dies with a RecursionError about 1,000 levels down. Strings are skipped whole."""
    depth = pos = 0
    while pos < len(body):
        m = _STRUCTURE.search(body, pos, pos + _SCAN)
        if m is None:
            pos += _SCAN
            continue
        c, pos = body[m.start()], m.end()
        if c == 0x22:  # '"': skip to the end of the string, a window at a time
            while True:
                if pos >= len(body):
                    return  # an unterminated string: json.loads names the error
                stop = _STRING_STOP.search(body, pos, pos + _SCAN)
                if stop is None:
                    pos += _SCAN
                elif body[stop.start()] == 0x5C:  # a backslash escapes the next byte
                    pos = stop.start() + 2
                else:
                    pos = stop.end()
                    break
        elif c in b"[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise bad_request(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels (the limit)")
        else:
            depth -= 1


def _number(parse):
    def check(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise bad_request(f"body: a JSON number of {len(text)} characters; the limit is {MAX_NUMBER_CHARS}")
        return parse(text)
    return check


def _no_constant(name: str):
    raise bad_request(f"body: {name} is not valid JSON (numbers must be finite)")


def parse_json(body: bytes) -> dict:
    """A JSON object, with nesting and number length bounded (:data:`MAX_JSON_DEPTH`,
    :data:`MAX_NUMBER_CHARS`). The number hooks are Python functions on purpose: a long parse on a
    worker thread then hands the interpreter back to the event loop between numbers."""
    _check_depth(body)
    try:
        obj = json.loads(body, parse_int=_number(int), parse_float=_number(float), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"body: not valid JSON ({e})") from None
    except RecursionError:
        raise bad_request(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels (the limit)") from None
    if not isinstance(obj, dict):
        raise bad_request(f"body: expected a JSON object, got {type(obj).__name__}")
    return obj


def b64decode(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"{field}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field}: not valid base64") from None


def parse_hf_json(body: bytes, num_classes: int, default_k: int) -> tuple[bytes, int]:
    """Hugging Face's JSON request ``{"inputs": "<base64 image>", "parameters": {"top_k": k}}``."""
    obj = parse_json(body)
    if "inputs" not in obj:
        raise bad_request("inputs: missing (the base64-encoded image)")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("parameters: expected an object")
    top_k = params.get("top_k")  # Hugging Face's clients may send null for "the default"
    k = parse_top_k(top_k, num_classes, "parameters.top_k") if top_k is not None else default_k
    return b64decode(obj["inputs"], "inputs"), k


HEADER_LENGTH = "Inference-Header-Content-Length"
"""The binary tensor data extension's header: the body's first N bytes are the JSON request, the rest
the inputs' raw data (and the same for an answer with binary outputs)."""


@dataclass
class InferRequest:
    """A parsed v2 infer request: exactly one of ``images`` (encoded) or ``tensor`` is set."""

    id: str | None
    images: list[bytes] | None
    tensor: torch.Tensor | None
    classification: int | None  # top-k strings instead of probabilities
    binary_output: bool = False  # answer with the binary tensor data extension

    @property
    def batch(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)


def _flatten(data: object, field: str, depth: int) -> list:
    """v2 accepts tensor data flat or nested in row-major order (at most ``depth`` levels: the shape's)."""
    if not isinstance(data, list):
        raise bad_request(f"{field}: expected a list")
    if data and isinstance(data[0], list):
        if depth <= 1:
            raise bad_request(f"{field}: nested deeper than the tensor's shape")
        return [x for i, row in enumerate(data) for x in _flatten(row, f"{field}[{i}]", depth - 1)]
    return data


def _shape(value: object, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise bad_request(f"{field}: expected a list of non-negative integers, got {value!r}")
    return value


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a body, by the binary extension's header when present."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise bad_request(f"{HEADER_LENGTH}: expected the JSON header's byte count (at most the body's "
                          f"{len(body)} bytes), got {header_length!r}")
    n = int(header_length)
    return body[:n], body[n:]


def _binary_elements(raw: bytes, field: str) -> list[bytes]:
    """BYTES tensor data in the binary extension: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise bad_request(f"{field}: binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise bad_request(f"{field}: binary BYTES element of {n} bytes runs past binary_data_size")
        out.append(raw[at + 4: at + 4 + n])
        at += 4 + n
    return out


def _float_tensor(values: list, shape: list[int]) -> torch.Tensor:
    """JSON numbers → a float32 tensor, a slice at a time (each slice is quick, so a big tensor does not hold
    the interpreter away from the event loop in one piece)."""
    out = np.empty(len(values), np.float32)
    for i in range(0, len(values), 65536):
        chunk = values[i: i + 65536]
        if not all(type(v) is float or type(v) is int for v in chunk):
            raise bad_request("inputs[0].data: FP32 data must be numbers")
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused by the caller
            out[i: i + 65536] = chunk
    return torch.from_numpy(out).view(shape)


def parse_infer(body: bytes, input_size: int, num_classes: int, max_batch: int,
                header_length: str | None = None) -> InferRequest:
    """An Open Inference Protocol (v2) infer request body, checked field by field; with the binary
    tensor data extension when ``header_length`` (the ``Inference-Header-Content-Length`` header) is set."""
    head, binary = _split_body(body, header_length)
    obj = parse_json(head)
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad_request("id: expected a string")
    params = _params(obj, "parameters")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(f"inputs: expected a list of exactly one tensor object ({IMAGE_INPUT!r} as BYTES "
                          f"or {TENSOR_INPUT!r} as FP32)")
    inp = inputs[0]
    size = _params(inp, "inputs[0].parameters").get("binary_data_size")
    for key in ("name", "shape", "datatype") + (() if size is not None else ("data",)):
        if key not in inp:
            raise bad_request(f"inputs[0].{key}: missing")
    shape = _shape(inp["shape"], "inputs[0].shape")
    name, dtype = inp["name"], inp["datatype"]
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise bad_request(f"inputs[0].parameters.binary_data_size: {size!r}, but the body holds {len(binary)} "
                              f"bytes after the {HEADER_LENGTH} header's JSON")
    elif binary:
        raise bad_request(f"body: {len(binary)} bytes after the JSON header, but no input has binary_data_size")
    images = tensor = None
    if dtype == "BYTES":
        if size is not None:
            images = _binary_elements(binary, "inputs[0]")
        else:
            data = _flatten(inp["data"], "inputs[0].data", len(shape) or 1)
            images = [b64decode(v, f"inputs[0].data[{i}]") for i, v in enumerate(data)]
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] != len(images):
            raise bad_request(f"inputs[0].shape: {shape} does not match the {len(images)} BYTES elements of data "
                              "(expected [N] or [N, 1])")
    elif dtype == "FP32":
        want = [3, input_size, input_size]
        if len(shape) != 4 or shape[1:] != want:
            raise bad_request(f"inputs[0].shape: expected [N, {', '.join(map(str, want))}] for FP32, got {shape}")
        count = math.prod(shape)
        if size is not None:
            if size != 4 * count:
                raise bad_request(f"inputs[0].parameters.binary_data_size: {size} bytes, but shape {shape} "
                                  f"needs {4 * count} (float32, little-endian)")
            tensor = torch.from_numpy(np.frombuffer(binary, "<f4").astype(np.float32)).view(shape)
        else:
            data = _flatten(inp["data"], "inputs[0].data", len(shape))
            if len(data) != count:
                raise bad_request(f"inputs[0].data: {len(data)} values, but shape {shape} needs {count}")
            tensor = _float_tensor(data, shape)
        if not torch.isfinite(tensor).all():
            raise bad_request("inputs[0].data: FP32 data must be finite")
    else:
        raise bad_request(f"inputs[0].datatype: expected BYTES (encoded images) or FP32 (a preprocessed "
                          f"tensor), got {dtype!r}")
    expected_name = IMAGE_INPUT if dtype == "BYTES" else TENSOR_INPUT
    if name != expected_name:
        raise bad_request(f"inputs[0].name: a {dtype} input is named {expected_name!r}, got {name!r}")
    n = len(images) if images is not None else shape[0]
    if not 1 <= n <= max_batch:
        raise bad_request(f"inputs[0].shape: batch of {n}; this server takes 1 to {max_batch} per request")
    k, binary_out = _parse_outputs(obj.get("outputs"), num_classes, params.get("binary_data_output") is True)
    return InferRequest(rid, images, tensor, k, binary_out)


def _params(obj: dict, field: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request(f"{field}: expected an object")
    return params


def _parse_outputs(outputs: object, num_classes: int, binary_default: bool) -> tuple[int | None, bool]:
    """(the classification k requested for the single output or None for probabilities, binary answer?)."""
    if outputs is None:
        return None, binary_default
    if not isinstance(outputs, list) or len(outputs) > 1 or (outputs and not isinstance(outputs[0], dict)):
        raise bad_request(f"outputs: expected a list of at most one object (the {PROBS_OUTPUT!r} output)")
    if not outputs:
        return None, binary_default
    out = outputs[0]
    if out.get("name") != PROBS_OUTPUT:
        raise bad_request(f"outputs[0].name: this model's output is {PROBS_OUTPUT!r}, got {out.get('name')!r}")
    params = _params(out, "outputs[0].parameters")
    binary = params.get("binary_data", binary_default)
    if not isinstance(binary, bool):
        raise bad_request(f"outputs[0].parameters.binary_data: expected true or false, got {binary!r}")
    k = params.get("classification")
    if k is None:
        return None, binary
    return parse_top_k(k, num_classes, "outputs[0].parameters.classification"), binary


def infer_response(model_name: str, req: InferRequest, probs: torch.Tensor,
                   labels: list[str]) -> tuple[dict, bytes]:
    """The v2 answer (JSON header, binary data): probabilities, or ``"score:index:label"`` strings with the
    classification extension (shape ``[k]`` for one image, ``[batch, k]`` for several). With
    ``req.binary_output`` the data is binary (``parameters.binary_data_size``), else in the JSON."""
    if req.classification is None:
        out = {"name": PROBS_OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
        values = probs.float().contiguous()
        raw = values.numpy().astype("<f4").tobytes() if req.binary_output else b""
        data = None if req.binary_output else values.flatten().tolist()
    else:
        k = req.classification
        scores, idx = probs.topk(k, dim=1)
        data = [f"{float(s)}:{int(i)}:{labels[int(i)]}" for srow, irow in zip(scores, idx)
                for s, i in zip(srow, irow)]
        out = {"name": PROBS_OUTPUT, "datatype": "BYTES", "shape": [k] if len(probs) == 1 else [len(probs), k]}
        raw = b"".join(struct.pack("<I", len(b)) + b for b in (d.encode() for d in data)) if req.binary_output else b""
        data = None if req.binary_output else data
    if req.binary_output:
        out["parameters"] = {"binary_data_size": len(raw)}
    else:
        out["data"] = data
    answer = {"model_name": model_name, "outputs": [out]}
    if req.id is not None:
        answer["id"] = req.id
    return answer, raw
