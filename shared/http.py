"""HTTP building blocks every service shares: ops routes, JSON errors, the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.tracing import configure_tracing


class ApiError(Exception):
    """An error a client caused or must know about: mapped to ``{error, message}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def ops_router(runtime: ServiceRuntime) -> APIRouter:
    """``/healthz`` (alive), ``/readyz`` (dependencies, and why not), ``/metrics`` (Prometheus).

    The runtime path is aio-pika, not FastStream subscribers, so FastStream's Prometheus
    middleware does not apply: ``shared.metrics`` counts what it would, and more.
    """
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": runtime.service}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, checks = await runtime.readiness()
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready"}
        if not ready:
            body["reasons"] = checks.pop("reasons", [])
        body["checks"] = checks
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        await runtime.refresh_metrics()  # outbox, readiness, dead letters, the service's own
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as JSON ``{"error": code, "message": text}``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.code, "message": exc.message}, status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return JSONResponse({"error": "invalid_request", "message": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "message": str(exc.detail)}, status_code=exc.status_code
        )


OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _is_ops_request(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in OPS_PATHS


def create_service_app(runtime: ServiceRuntime, *, title: str, **kwargs: Any) -> FastAPI:
    """A FastAPI app whose lifespan starts and stops ``runtime``, with ops routes."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    # FastAPI traces HTTP requests itself once a tracer provider exists: keep the API's
    # requests, not the probes and scrapes, and no per-dependency spans.
    kwargs.setdefault("telemetry", {"operation_spans": False, "exclude": _is_ops_request})
    app = FastAPI(title=title, lifespan=lifespan, **kwargs)
    app.state.service = runtime.service
    install_error_handlers(app)
    app.include_router(ops_router(runtime))
    return app


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run the service's HTTP server; SIGTERM drains through the app's lifespan.

    Tracing is configured here, once per process, from the ``OTEL_*`` variables.
    """
    import gc
    import signal

    import uvicorn

    configure_tracing(f"grantwire-{getattr(app.state, 'service', app.title)}")
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown; with a no-op
    # Python handler in place that re-raise does not kill us, so a drained exit is 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    # The modules, settings and app built so far live as long as the process: keep them out
    # of the cyclic collector's full scans (one took ~65 ms here, a pause every message
    # in flight would wait out).
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
