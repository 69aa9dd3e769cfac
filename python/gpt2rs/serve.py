"""Scale-out serving on Ray Serve: replicas that each hold an ``AsyncEngine`` (continuous batching
inside the replica) behind Ray Serve's HTTP proxy, which routes each request to a replica with few
requests in flight. The API is ``gpt2 serve``'s (``gpt2rs.openai_api``): ``/v1/completions``,
``/v1/chat/completions`` (SSE streams with ``"stream": true``), ``/v1/embeddings``, ``/v1/models``,
``/health``.

One command (a local Ray is started when none is running)::

    python -m gpt2rs.serve --model gpt2 --dtype q8 --replicas 2 --threads 1 --port 8000
    python -m gpt2rs.serve --random gpt2 --autoscale 1:4          # autoscaling on ongoing requests
    serve run gpt2rs.serve:app_builder model=gpt2 replicas=2      # Ray's own CLI, same options

Replicas are health-checked (``check_health``: the engine's thread runs), replaced when they fail
or die, and drained on scale-down or shutdown: a replica being stopped takes no new requests and
finishes those in flight for up to ``graceful_shutdown_timeout_s`` (``--drain-timeout``).
"""


import argparse
import json
import os
import sys
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import AsyncEngine, Model
from .openai_api import ApiError, OpenAIFrontend, grouped, parse_object

# Bodies beyond this are refused (413), as `gpt2 serve --max-body`'s default.
MAX_BODY = 4 << 20

app = FastAPI(title="gpt2rs", docs_url=None, redoc_url=None, openapi_url=None)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown paths (404) and wrong methods (405) in OpenAI's error shape too.
    msg = {404: f"no route for {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    return _error(ApiError(exc.status_code, msg.get(exc.status_code, str(exc.detail))))


async def _body(request: Request) -> dict:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    return parse_object(bytes(raw))


@serve.deployment(
    # Health: Ray calls check_health every period; a replica that fails it (or dies) is replaced.
    health_check_period_s=5,
    health_check_timeout_s=10,
    # Draining: a replica being stopped gets no new requests and has this long to finish its own.
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(app)
class GPT2Deployment:
    """One replica: a model, an ``AsyncEngine`` over it and the OpenAI routes."""

    def __init__(self, model: Optional[str] = None, random: Optional[str] = None,
                 dtype: str = "f32", threads: int = 1, parallel: int = 8, max_queue: int = 32,
                 served_model_name: Optional[str] = None, chat_template: Optional[dict] = None,
                 stream_interval: int = 1):
        if random:
            m = Model.random(random, dtype=dtype, threads=threads)
        else:
            m = Model.from_pretrained(model or "gpt2", dtype=dtype, threads=threads)
        name = served_model_name or random or model or "gpt2"
        self.engine = AsyncEngine(m, parallel=parallel, max_queue=max_queue)
        self.api = OpenAIFrontend(self.engine, name, parallel, max_queue, chat_template)
        self.stream_interval = stream_interval

    def check_health(self):
        if not self.engine.is_alive():
            raise RuntimeError("the engine's thread has stopped")

    async def _generate(self, request: Request, chat: bool):
        try:
            plan = self.api.plan(await _body(request), chat)
            if plan["stream"]:
                lines = self.api.run_stream(plan)
                if self.stream_interval > 1:
                    lines = grouped(lines, self.stream_interval)
                return StreamingResponse(lines, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return JSONResponse(await self.api.run(plan))
        except ApiError as e:
            return _error(e)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        try:
            return JSONResponse(await self.api.embeddings(await _body(request)))
        except ApiError as e:
            return _error(e)

    @app.get("/v1/models")
    async def models(self):
        return JSONResponse(self.api.models())

    @app.get("/health")
    async def health(self):
        if not self.engine.is_alive():
            return _error(ApiError(503, "the engine's thread has stopped"))
        return JSONResponse({"status": "ok", **self.engine.stats(), "pid": os.getpid()})

    @app.get("/stats")
    async def stats(self):
        """This replica's engine: running, waiting, in_flight (and its pid: which replica)."""
        return JSONResponse({**self.engine.stats(), "pid": os.getpid()})


def build(replicas: int = 1, autoscale: Optional[str] = None, threads: int = 1,
          parallel: int = 8, max_queue: int = 32, drain_timeout: float = 30.0,
          max_queued_requests: int = 256, stream_interval: int = 1, **engine) -> Any:
    """The bound application: ``replicas`` fixed replicas, or ``autoscale="MIN:MAX"`` replicas
    scaled on ongoing requests (a replica is wanted per ``parallel`` requests in flight). Each
    replica reserves ``threads`` CPUs and takes at most ``parallel + max_queue`` requests; the
    proxy holds at most ``max_queued_requests`` more (then 503), so no queue is unbounded.
    ``stream_interval``: a stream's events are sent that many at a time after the first (vLLM's
    ``--stream-interval``), which saves Ray's per-message cost at the price of choppier streams."""
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be at least 1, got {stream_interval}")
    opts: dict = dict(
        ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=parallel + max_queue,
        max_queued_requests=max_queued_requests,
        graceful_shutdown_timeout_s=drain_timeout,
    )
    if autoscale:
        lo, hi = (int(x) for x in autoscale.split(":"))
        opts["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
            "target_ongoing_requests": parallel,
            "upscale_delay_s": 5, "downscale_delay_s": 60,
        }
    else:
        opts["num_replicas"] = replicas
    return GPT2Deployment.options(**opts).bind(threads=threads, parallel=parallel,
                                               max_queue=max_queue, stream_interval=stream_interval,
                                               **engine)


def app_builder(args: dict) -> Any:
    """For ``serve run gpt2rs.serve:app_builder model=gpt2 replicas=2 ...`` (values as text)."""
    ints = {"replicas", "threads", "parallel", "max_queue", "max_queued_requests", "stream_interval"}
    kw = {k: (int(v) if k in ints else float(v) if k == "drain_timeout" else v) for k, v in args.items()}
    return build(**kw)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m gpt2rs.serve", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint directory or hub id (default gpt2)")
    src.add_argument("--random", metavar="PRESET", help="random weights at a released shape (gpt2, gpt2-medium, ...)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8"])
    ap.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    ap.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale on ongoing requests instead")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per replica")
    ap.add_argument("--parallel", type=int, default=8, help="sequences batched per replica")
    ap.add_argument("--max-queue", type=int, default=32, help="requests waiting per replica")
    ap.add_argument("--max-queued-requests", type=int, default=256, help="requests the proxy holds for busy replicas (then 503)")
    ap.add_argument("--stream-interval", type=int, default=1, metavar="N",
                    help="send a stream's tokens N at a time after the first (fewer Ray messages)")
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="seconds a stopping replica has to finish")
    ap.add_argument("--served-model-name")
    ap.add_argument("--chat-template", metavar="FILE", help="JSON, as gpt2 serve's --chat-template")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started (default: all)")
    a = ap.parse_args(argv)
    if a.stream_interval < 1:
        ap.error(f"--stream-interval must be at least 1, got {a.stream_interval}")
    return a


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> None:
    import signal

    import ray

    a = parse(argv)
    template = None
    if a.chat_template:
        with open(a.chat_template) as f:
            template = json.load(f)
    if not ray.is_initialized():
        ray.init(num_cpus=a.num_cpus, include_dashboard=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(build(replicas=a.replicas, autoscale=a.autoscale, threads=a.threads,
                    parallel=a.parallel, max_queue=a.max_queue, drain_timeout=a.drain_timeout,
                    max_queued_requests=a.max_queued_requests, stream_interval=a.stream_interval,
                    model=a.model, random=a.random,
                    dtype=a.dtype, served_model_name=a.served_model_name, chat_template=template),
              name="gpt2rs", route_prefix="/", blocking=False)
    # SIGINT (also in a background job, where the shell ignores it) drains and stops. SIGTERM
    # stays Ray's, which exits at once.
    signal.signal(signal.SIGINT, _stop)
    print(f"listening on http://{a.host}:{a.port}", flush=True)
    try:
        import time

        # Short sleeps: a signal may reach another thread, and Python runs its handler only when
        # the main thread wakes.
        while True:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        # Replicas drain (up to --drain-timeout) before they stop.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    # The deployment must come from the importable module (replicas import it), not __main__.
    from gpt2rs.serve import main as _main

    sys.exit(_main())
