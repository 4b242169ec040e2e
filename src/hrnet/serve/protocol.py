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
from dataclasses import dataclass

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
    return parse_int(value, 1, num_classes, field)


def parse_json(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"body: not valid JSON ({e})") from None
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
    k = parse_top_k(params["top_k"], num_classes, "parameters.top_k") if "top_k" in params else default_k
    return b64decode(obj["inputs"], "inputs"), k


@dataclass
class InferRequest:
    """A parsed v2 infer request: exactly one of ``images`` (encoded) or ``tensor`` is set."""

    id: str | None
    images: list[bytes] | None
    tensor: torch.Tensor | None
    classification: int | None  # top-k strings instead of probabilities

    @property
    def batch(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)


def _flatten(data: object, field: str) -> list:
    """v2 accepts tensor data flat or nested in row-major order."""
    if not isinstance(data, list):
        raise bad_request(f"{field}: expected a list")
    if data and isinstance(data[0], list):
        return [x for i, row in enumerate(data) for x in _flatten(row, f"{field}[{i}]")]
    return data


def _shape(value: object, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise bad_request(f"{field}: expected a list of non-negative integers, got {value!r}")
    return value


def parse_infer(body: bytes, input_size: int, num_classes: int, max_batch: int) -> InferRequest:
    """An Open Inference Protocol (v2) infer request body, checked field by field."""
    obj = parse_json(body)
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad_request("id: expected a string")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(f"inputs: expected a list of exactly one tensor object ({IMAGE_INPUT!r} as BYTES "
                          f"or {TENSOR_INPUT!r} as FP32)")
    inp = inputs[0]
    for key in ("name", "shape", "datatype", "data"):
        if key not in inp:
            raise bad_request(f"inputs[0].{key}: missing")
    shape = _shape(inp["shape"], "inputs[0].shape")
    data = _flatten(inp["data"], "inputs[0].data")
    name, dtype = inp["name"], inp["datatype"]
    images = tensor = None
    if dtype == "BYTES":
        if len(shape) != 1 or shape[0] != len(data):
            raise bad_request(f"inputs[0].shape: {shape} does not match the {len(data)} BYTES elements of data "
                              "(expected [N])")
        images = [b64decode(v, f"inputs[0].data[{i}]") for i, v in enumerate(data)]
    elif dtype == "FP32":
        want = [3, input_size, input_size]
        if len(shape) != 4 or shape[1:] != want:
            raise bad_request(f"inputs[0].shape: expected [N, {', '.join(map(str, want))}] for FP32, got {shape}")
        if len(data) != math.prod(shape):
            raise bad_request(f"inputs[0].data: {len(data)} values, but shape {shape} needs {math.prod(shape)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
            raise bad_request("inputs[0].data: FP32 data must be numbers")
        tensor = torch.tensor(data, dtype=torch.float32).view(shape)
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
    return InferRequest(rid, images, tensor, _parse_outputs(obj.get("outputs"), num_classes))


def _parse_outputs(outputs: object, num_classes: int) -> int | None:
    """The classification k requested for the single output, or None for probabilities."""
    if outputs is None:
        return None
    if not isinstance(outputs, list) or len(outputs) > 1 or (outputs and not isinstance(outputs[0], dict)):
        raise bad_request(f"outputs: expected a list of at most one object (the {PROBS_OUTPUT!r} output)")
    if not outputs:
        return None
    out = outputs[0]
    if out.get("name") != PROBS_OUTPUT:
        raise bad_request(f"outputs[0].name: this model's output is {PROBS_OUTPUT!r}, got {out.get('name')!r}")
    params = out.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("outputs[0].parameters: expected an object")
    if "classification" not in params:
        return None
    return parse_top_k(params["classification"], num_classes, "outputs[0].parameters.classification")


def infer_response(model_name: str, req: InferRequest, probs: torch.Tensor, labels: list[str]) -> dict:
    """The v2 answer: probabilities, or ``"score:index:label"`` strings with the classification
    extension (shape ``[k]`` for one image, ``[batch, k]`` for several)."""
    if req.classification is None:
        out = {"name": PROBS_OUTPUT, "datatype": "FP32", "shape": list(probs.shape),
               "data": probs.flatten().tolist()}
    else:
        k = req.classification
        scores, idx = probs.topk(k, dim=1)
        data = [f"{float(s)}:{int(i)}:{labels[int(i)]}" for srow, irow in zip(scores, idx)
                for s, i in zip(srow, irow)]
        out = {"name": PROBS_OUTPUT, "datatype": "BYTES", "shape": [k] if len(probs) == 1 else [len(probs), k],
               "data": data}
    answer = {"model_name": model_name, "outputs": [out]}
    if req.id is not None:
        answer["id"] = req.id
    return answer
