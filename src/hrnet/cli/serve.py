"""hrnet serve: an HTTP inference server with dynamic batching (Hugging Face and KServe v2 protocols)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ..deploy import BACKENDS
from ..errors import HRNetError
from ._common import (add_model_args, add_output_args, add_parser, add_precision_arg, crop_fraction, crop_size,
                      integer_arg, positive_int, show_progress)


class ServeError(HRNetError):
    """The serving extra is missing, or the server options do not fit together."""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "serve", "serve a model over HTTP: /v1/classify, KServe v2 /v2/..., /metrics, a page at /",
                   "  hrnet serve hrnet-w18                     # http://127.0.0.1:8000/\n"
                   "  hrnet serve hrnet-w18 --checkpoint my.safetensors --port 9000\n"
                   "  hrnet serve hrnet-w48-ssld --host 0.0.0.0 --max-batch 32 --max-wait-ms 10 --workers 2\n"
                   "  hrnet serve hrnet-w18 --checkpoint w18.int8.onnx      # int8, from 'hrnet quantize'\n"
                   "  hrnet serve hrnet-w18 --backend compile --precision bf16\n"
                   "  hrnet serve hrnet-w18 --device cuda --precision bf16 --max-batch 64   # fused on the GPU\n"
                   "  curl --data-binary @cat.jpg 'http://127.0.0.1:8000/v1/classify?top_k=3'")
    add_model_args(p)
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="inference backend (default onnxruntime, the fastest fp32 on CPU; fused for bf16/fp16 "
                        "and on a GPU; see 'hrnet bench')")
    add_precision_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=lambda t: integer_arg(t, 0, 65535), default=8000, help="default 8000 (0: any free port)")
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N", help="images per model call (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="T",
                   help="longest an image waits for others to join its batch (default 5)")
    p.add_argument("--max-queue", type=positive_int, default=256, metavar="N",
                   help="images admitted and not yet answered; beyond it requests get 503 (default 256)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="server processes sharing the port, each with its own model and a share of the cores")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB", help="request body limit (default 20)")
    p.add_argument("--upload-timeout", type=float, default=30.0, metavar="S",
                   help="a request body must arrive within this many seconds (default 30)")
    p.add_argument("--header-timeout", type=float, default=5.0, metavar="S",
                   help="a connection must send a complete request head within this many seconds of opening or of "
                        "its last answer, else it is closed (idle and slowloris connections; default 5)")
    p.add_argument("--max-connections", type=positive_int, default=1000, metavar="N",
                   help="open connections; beyond it the ones waiting for a request head are closed, oldest first "
                        "(default 1000; admission of work is --max-queue, never the socket count)")
    p.add_argument("--input-size", type=crop_size, default=None, metavar="PX",
                   help="centre-crop size (default: the model record's, 224)")
    p.add_argument("--crop-pct", type=crop_fraction, default=None, metavar="F", help="crop / resized short edge")
    add_output_args(p)  # --json: one line describing the server on stdout once the model is loaded
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..deploy.manifest import is_optimize_dir, read_manifest

    try:
        from ..serve import connections
        from ..serve.app import ENV_VAR, ServeConfig, build_classifier, config_env, create_app, default_backend
    except ImportError as e:
        raise ServeError(f"hrnet serve needs the serving extra ({e.name} is missing): "
                         "pip install 'hrnet[serve]'") from None
    try:
        config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_upload_mb=args.max_upload_mb, upload_timeout_s=args.upload_timeout)
        if not args.header_timeout > 0:
            raise ValueError(f"header_timeout must be > 0, got {args.header_timeout:g}")
    except ValueError as e:
        raise ServeError(f"invalid server options: {e}") from None
    if args.workers < 1:
        raise ServeError(f"--workers must be at least 1, got {args.workers}")
    from ..distributed import check_device

    args.device = check_device(args.device)  # in one line here, not in every worker
    if args.backend is None and is_optimize_dir(args.checkpoint):  # run what hrnet optimize chose
        args.backend = read_manifest(args.checkpoint)[0].backend
    args.backend = args.backend or default_backend(args.precision, args.device)
    build = {"backend": args.backend, "precision": args.precision, "checkpoint": args.checkpoint,
             "device": args.device, "input_size": args.input_size, "crop_pct": args.crop_pct}
    options = {"host": args.host, "port": args.port, "log_level": "warning" if args.quiet else "info",
               "access_log": False, "timeout_graceful_shutdown": 60, "proxy_headers": False,
               # read by connections.GuardedH11Protocol as its request-head deadline and connection cap
               "timeout_keep_alive": args.header_timeout, "limit_concurrency": args.max_connections}
    _raise_open_files(args.max_connections)
    if args.workers == 1:
        app = create_app(build_classifier(args.name, progress=show_progress(args), **build), config=config)
        _announce(args, config)
        return _serve(connections, app, options)
    from ..builder import get_model_info

    get_model_info(args.name)  # an unknown name fails here in one line, not in every worker
    if args.checkpoint and "://" not in args.checkpoint and not os.path.exists(args.checkpoint):
        raise ServeError(f"--checkpoint {args.checkpoint}: no such file")
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    os.environ[ENV_VAR] = config_env(args.name, config, threads=threads, **build)
    _announce(args, config)
    return _serve(connections, "hrnet.serve.app:app_from_env", {**options, "factory": True, "workers": args.workers})


def _serve(connections, app, options: dict) -> int:
    if not connections.run(app, **options):
        raise ServeError(f"the server did not start on {options['host']}:{options['port']} (see the log above)")
    return 0


def _raise_open_files(connections: int) -> None:
    """Lift the soft open-files limit towards the hard one, so that ``--max-connections`` sockets (plus
    the model's files) fit: a full descriptor table would stop the server accepting anyone."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def _announce(args: argparse.Namespace, config) -> None:
    url = f"http://{args.host}:{args.port}"
    if args.json:
        print(json.dumps({"url": url, "name": args.name, "backend": args.backend, "precision": args.precision,
                          "workers": args.workers,
                          "pid": os.getpid(), **asdict(config)}), flush=True)
    elif not args.quiet:
        precision = f" {args.precision}" if args.precision else ""
        print(f"hrnet: serving {args.name} ({args.backend}{precision}, batches up to {args.max_batch}, "
              f"{args.workers} worker{'s' * (args.workers > 1)}) at {url}/  (POST {url}/v1/classify)",
              file=sys.stderr, flush=True)
