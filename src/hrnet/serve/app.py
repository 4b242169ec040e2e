"""The ASGI app: Hugging Face-style ``/v1/classify``, the Open Inference Protocol v2, Grad-CAM,
Prometheus ``/metrics`` and a page at ``/``, all over one dynamic batcher.

Every request body is read with a size limit checked while it arrives and a deadline for the whole
upload; images are decoded and preprocessed on a thread pool, classified in batches, and each
refusal is a JSON ``{"error": ...}`` with its status (the v2 protocol's error shape).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from torch import nn

from ..data import ImageReadError, NotAnImageError, decode_image
from ..deploy.engine import Classifier, topk_records
from ..deploy.runners import serving_backend
from .batcher import Batcher
from .protocol import (HEADER_LENGTH, IMAGE_INPUT, PROBS_OUTPUT, TENSOR_INPUT, RequestError, bad_request,
                       infer_response, parse_hf_json, parse_infer, parse_int, parse_multipart, parse_top_k)

log = logging.getLogger("hrnet.serve")
ENV_VAR = "HRNET_SERVE_CONFIG"
"""JSON of a :class:`ServeConfig`: how each ``--workers`` process builds its app (see :func:`app_from_env`)."""


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches and what it accepts; the defaults suit a CPU."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images admitted and not yet answered; beyond it, 503
    max_upload_mb: float = 20.0
    upload_timeout_s: float = 30.0  # the whole body must arrive within this
    max_files: int = 64  # images in one multipart or v2 request
    decode_threads: int = min(4, os.cpu_count() or 1)
    top_k: int = 5

    def __post_init__(self):
        for key in ("max_batch", "max_queue", "max_files", "decode_threads", "top_k"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_queue < self.max_batch:
            raise ValueError(f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch})")
        if self.max_wait_ms < 0 or self.max_upload_mb <= 0 or self.upload_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0, max_upload_mb and upload_timeout_s > 0")


class _Metrics:
    """The Prometheus series, in a registry of their own (two apps in one process do not clash)."""

    def __init__(self, batcher: Batcher):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hrnet_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("hrnet_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.latency = Histogram("hrnet_request_seconds", "Request latency from first byte read to answer",
                                 ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("hrnet_batch_size", "Images per model call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("hrnet_batch_seconds", "Duration of one model call", registry=r,
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        Gauge("hrnet_queue_depth", "Images decoded and waiting for a model call",
              registry=r).set_function(lambda: batcher.queue_depth)
        Gauge("hrnet_pending_images", "Images admitted and not yet answered",
              registry=r).set_function(lambda: batcher.pending)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


def class_names(clf: Classifier) -> list[str]:
    """The names of the model's classes, index by index: the one place serving asks the model (or its
    checkpoint) for them, for ``label``, the v2 classification strings, the model config and the page."""
    return list(clf.labels)


def _decode_error(e: ImageReadError) -> RequestError:
    if isinstance(e, NotAnImageError):
        return RequestError(415, "not_an_image", str(e))
    return RequestError(422, "undecodable", str(e))


class Server:
    """The state behind the routes: classifier, batcher, decode pool, metrics."""

    def __init__(self, clf: Classifier, name: str, config: ServeConfig):
        self.clf, self.name, self.config = clf, name, config
        self.labels = class_names(clf)
        self.limit = int(config.max_upload_mb * 2**20)
        self.batcher = Batcher(clf.logits, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1e3,
                               max_pending=config.max_queue)
        self.metrics = _Metrics(self.batcher)
        self.batcher.on_batch = self.metrics.batch
        self.decoder = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="hrnet-decode")
        # one thread parses bodies: parsing holds the interpreter, and one contender for it leaves the
        # event loop more of it than several
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="hrnet-parse")
        self.warm_up()

    def warm_up(self) -> None:
        """One call at batch 1 and one at ``max_batch`` before the first request: the first requests are
        not slow, and the runtime's buffers (onnxruntime's arena grows per batch shape) reach their
        steady size now instead of during serving."""
        size = self.clf.transform.input_size
        for batch in sorted({1, self.config.max_batch}):
            self.clf.logits(torch.zeros(batch, 3, size, size))

    # ---- reading and decoding ----

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it exceeds the limit and 408 if it is not all there
        within the upload deadline (a stalled or trickling client)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise self._too_large(int(length))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.upload_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.limit:
                        raise self._too_large(size, at_least=True)
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(408, "timeout", f"upload not complete within {self.config.upload_timeout_s:g} s "
                                               f"({size} bytes received)") from None
        except ClientDisconnect:  # the client's doing, not ours: its own metric, never "internal"
            raise RequestError(499, "client_disconnect", f"client closed the connection after {size} bytes "
                                                         "of the body") from None
        return b"".join(chunks)

    async def off_loop(self, fn: Callable, *args):
        """``fn(*args)`` on a worker thread: parsing a large body must not stall the event loop (health
        checks, other requests)."""
        return await asyncio.get_running_loop().run_in_executor(self.parser, fn, *args)

    def _too_large(self, size: int, at_least: bool = False) -> RequestError:
        return RequestError(413, "too_large", f"body of {'more than ' if at_least else ''}{size} bytes exceeds "
                                              f"the limit of {self.limit} bytes ({self.config.max_upload_mb:g} MB)")

    def _prepare(self, data: bytes, name: str) -> tuple[object, torch.Tensor]:
        """Decode and preprocess on a decoder thread: (the centre crop, the model's input tensor)."""
        crop = self.clf.transform.crop(decode_image(data, name))
        return crop, self.clf.transform.normalize(crop)

    async def prepare(self, data: bytes, name: str) -> tuple[object, torch.Tensor]:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decoder, self._prepare, data, name)
        except ImageReadError as e:
            raise _decode_error(e) from None

    async def classify(self, images: list[tuple[str, bytes]]) -> torch.Tensor:
        """Probabilities ``[len(images), classes]``: decoded concurrently, classified in batches."""
        with self.batcher.admit(len(images)):
            tensors = await asyncio.gather(*(self.prepare(data, name) for name, data in images))
            rows = await asyncio.gather(*(self.batcher.classify(x) for _, x in tensors))
        return torch.stack(rows)

    async def classify_tensor(self, x: torch.Tensor) -> torch.Tensor:
        with self.batcher.admit(len(x)):
            return torch.stack(await asyncio.gather(*(self.batcher.classify(row) for row in x)))

    # ---- endpoints ----

    async def v1_classify(self, request: Request) -> Response:
        """Raw image bytes → ``[{"label", "score", "index"}]``; multipart with files → one such list
        per file; Hugging Face JSON ``{"inputs": base64, "parameters": {"top_k": k}}`` → one list."""
        n = len(self.labels)
        k = parse_top_k(request.query_params["top_k"], n) if "top_k" in request.query_params else self.config.top_k
        k = min(k, n)
        body = await self.read_body(request)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            files, fields = await self.off_loop(parse_multipart, body, ctype, self.config.max_files + 8)
            if not files:
                raise bad_request("multipart body: no file part (send images as file fields)")
            if len(files) > self.config.max_files:
                raise bad_request(f"multipart body: {len(files)} files; at most {self.config.max_files} per request")
            if "top_k" in fields:
                k = parse_top_k(fields["top_k"], n)
            return JSONResponse(topk_records(await self.classify(files), self.labels, k))
        if ctype.startswith("application/json"):
            data, k = await self.off_loop(parse_hf_json, body, n, k)
        else:
            data = body
        return JSONResponse(topk_records(await self.classify([("upload", data)]), self.labels, k)[0])

    async def v1_cam(self, request: Request) -> Response:
        """Raw image bytes → a PNG: Grad-CAM over the crop the model saw, next to the top-5 bars
        (``class_index`` picks the class to explain, default the top one)."""
        from ..inference.cam import explain

        if self.clf.model is None:
            raise RequestError(501, "unavailable", "Grad-CAM needs the PyTorch model; this server runs an ONNX file")
        n = len(self.labels)
        c = request.query_params.get("class_index")
        c = None if c is None else parse_int(c, 0, n - 1, "class_index")
        body = await self.read_body(request)

        def draw(crop, x) -> bytes:
            out = io.BytesIO()
            explain(self.clf, crop, c)[0].save(out, "PNG")
            return out.getvalue()

        with self.batcher.admit(1):
            crop, x = await self.prepare(body, "upload")
            png = await self.batcher.on_model_thread(draw, crop, x)
        return Response(png, media_type="image/png")

    async def v2_model(self, request: Request) -> Response:
        self._check_name(request)
        s = self.clf.transform.input_size
        return JSONResponse({
            "name": self.name, "versions": ["1"], "platform": "hrnet",
            "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, s, s]}],
            "outputs": [{"name": PROBS_OUTPUT, "datatype": "FP32", "shape": [-1, len(self.labels)]}],
        })

    async def v2_model_config(self, request: Request) -> Response:
        """Triton's model configuration (what ``tritonclient``'s ``get_model_config`` reads): the batch
        limit, inputs and output without the batch dimension, and the class names."""
        self._check_name(request)
        s = self.clf.transform.input_size
        return JSONResponse({
            "name": self.name, "platform": "hrnet", "backend": "hrnet", "max_batch_size": self.config.max_files,
            "input": [{"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
                      {"name": TENSOR_INPUT, "data_type": "TYPE_FP32", "dims": [3, s, s]}],
            "output": [{"name": PROBS_OUTPUT, "data_type": "TYPE_FP32", "dims": [len(self.labels)]}],
            "parameters": {"class_names": {"string_value": json.dumps(self.labels)}},
        })

    async def model_info(self, request: Request) -> Response:
        """What the page shows and asks for: the model's name, class count, class names and input size."""
        return JSONResponse({"name": self.name, "num_classes": len(self.labels), "labels": self.labels,
                             "input_size": self.clf.transform.input_size, "top_k": min(self.config.top_k,
                                                                                       len(self.labels))})

    async def v2_model_ready(self, request: Request) -> Response:
        self._check_name(request)
        return JSONResponse({"name": self.name, "ready": True})

    async def v2_infer(self, request: Request) -> Response:
        self._check_name(request)
        body = await self.read_body(request)
        header_length = request.headers.get(HEADER_LENGTH)
        req = await self.off_loop(parse_infer, body, self.clf.transform.input_size, len(self.labels),
                                  self.config.max_files, header_length)
        if req.images is not None:
            probs = await self.classify([(f"inputs[0].data[{i}]", d) for i, d in enumerate(req.images)])
        else:
            probs = await self.classify_tensor(req.tensor)
        answer, raw = infer_response(self.name, req, probs, self.labels)
        if not req.binary_output:
            return JSONResponse(answer)
        head = json.dumps(answer).encode()
        return Response(head + raw, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))})

    def _check_name(self, request: Request) -> None:
        name = request.path_params["name"]
        if name != self.name:
            raise RequestError(404, "unknown_model", f"model {name!r} is not served here (this server: {self.name!r})")

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    async def close(self) -> None:
        await self.batcher.close()
        self.decoder.shutdown(wait=True)
        self.parser.shutdown(wait=True)

    def endpoint(self, label: str, fn: Callable[[Request], Awaitable[Response]]) -> Callable:
        """``fn`` with its refusals as JSON errors, and every answer counted and timed."""
        @functools.wraps(fn)
        async def handle(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await fn(request)
            except RequestError as e:
                self.metrics.errors.labels(e.kind).inc()
                response = JSONResponse({"error": str(e)}, e.status, headers=e.headers)
                if e.kind == "client_disconnect":
                    log.info("%s: %s", request.url.path, e)
            except Exception:
                log.exception("internal error on %s", request.url.path)
                self.metrics.errors.labels("internal").inc()
                response = JSONResponse({"error": "internal server error"}, 500)
            self.metrics.requests.labels(label, str(response.status_code)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
            return response
        return handle


def _json(obj: dict) -> Callable[[Request], Awaitable[Response]]:
    async def answer(request: Request) -> Response:
        return JSONResponse(obj)
    return answer


def create_app(model: Classifier | nn.Module | str, *, name: str | None = None, config: ServeConfig | None = None,
               **build) -> Starlette:
    """The serving app for ``model``: a :class:`~hrnet.inference.predict.Classifier`, or a model object or
    zoo name built by :func:`build_classifier` (``checkpoint`` (an ``.onnx`` file runs as it is),
    ``backend`` (default onnxruntime; fused for bf16/fp16), ``precision``, ``threads``, ``input_size``...). ``name`` is the
    v2 model name (default: the zoo record's name).

    Mount it in your own Starlette/FastAPI app (``app.mount("/hrnet", create_app(...))``) or run it
    with uvicorn. The batcher starts with the first request, so mounting needs no lifespan hook.
    """
    clf = model if isinstance(model, Classifier) else build_classifier(model, **build)
    record = getattr(clf.model, "pretrained_cfg", None)
    server = Server(clf, name or (record.name if record is not None else "hrnet"), config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await server.close()  # uvicorn gets here after in-flight requests are answered

    ep = server.endpoint
    routes = [
        Route("/", ep("page", server.page), methods=["GET"]),
        # Hugging Face's InferenceClient(base_url=...) posts to the root, as HF endpoints take it
        Route("/", ep("classify", server.v1_classify), methods=["POST"]),
        Route("/v1/classify", ep("classify", server.v1_classify), methods=["POST"]),
        Route("/v1/model", ep("model_info", server.model_info)),
        Route("/v1/cam", ep("cam", server.v1_cam), methods=["POST"]),
        Route("/v2", ep("v2_server", _json({"name": "hrnet", "version": _version(),
                                              "extensions": ["classification"]}))),
        Route("/v2/health/live", ep("live", _json({"live": True}))),
        Route("/v2/health/ready", ep("ready", _json({"ready": True}))),
        Route("/v2/models/{name}", ep("v2_model", server.v2_model)),
        Route("/v2/models/{name}/ready", ep("v2_model_ready", server.v2_model_ready)),
        Route("/v2/models/{name}/config", ep("v2_model_config", server.v2_model_config)),
        Route("/v2/models/{name}/infer", ep("v2_infer", server.v2_infer), methods=["POST"]),
        Route("/metrics", server.metrics_page),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def _version() -> str:
    from .._version import __version__
    return __version__


def app_from_env() -> Starlette:
    """The app described by the ``HRNET_SERVE_CONFIG`` environment variable: the factory each
    ``hrnet serve --workers N`` process imports (uvicorn's workers need an import string)."""
    spec = json.loads(os.environ[ENV_VAR])
    config = ServeConfig(**spec.pop("config"))
    return create_app(build_classifier(spec.pop("name"), **spec), config=config)


default_backend = serving_backend  # serving's backend unless one is named: the deploy table's


def build_classifier(model: nn.Module | str, *, backend: str | None = None, precision: str | None = None,
                     **build) -> Classifier:
    """``Classifier.build`` with serving's :func:`default_backend` (``threads``, an ``.onnx``
    ``checkpoint``... as there)."""
    return Classifier.build(model, backend=backend or default_backend(precision), precision=precision, **build)


def config_env(name: str, config: ServeConfig, **build) -> str:
    """The ``HRNET_SERVE_CONFIG`` value for :func:`app_from_env`."""
    return json.dumps({"name": name, "config": asdict(config), **build})
