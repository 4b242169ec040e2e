"""``hrnet serve``: an HTTP inference server (needs the ``hrnet[serve]`` extra).

:func:`create_app` builds the ASGI app: ``POST /v1/classify`` (Hugging Face shape), the Open
Inference Protocol v2 under ``/v2`` (KServe, Triton clients), ``POST /v1/cam`` (Grad-CAM picture),
``GET /metrics`` (Prometheus) and a page at ``/``, over one dynamic batcher.
"""

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
