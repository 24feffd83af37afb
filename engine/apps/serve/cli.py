"""engine-serve: an OpenAI-compatible HTTP server over one long-lived engine (uvicorn + Starlette, the `serve`
extra). Requests from every client are batched together by the engine core; steering, named specs and capture ride
in the request body. It binds 127.0.0.1 unless told otherwise, and on SIGTERM or Ctrl-C stops taking connections,
finishes the requests in flight, then ends the engine."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import sys
import time
from pathlib import Path

from engine.apps.flags import add_engine_args, config_from_args
from engine.apps.run import EXIT_FATAL, EXIT_OK, interrupt_on_signals, manifest_of
from engine.config import ConfigError
from engine.engine import Engine, EngineError
from engine.models import ModelNotFound, decoding_tokenizer
from engine.procs import stop_signals
from engine.storage.output import OutputError, check_output_path, lock_output

log = logging.getLogger("engine")
API_KEY_ENV = "ENGINE_API_KEY"


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-serve", description="Serve the engine over an OpenAI-compatible HTTP API "
                                "(/v1/completions, /v1/chat/completions, /v1/models, /health) and a playground at /.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 serves the network, with --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed when ready)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default ${API_KEY_ENV}; unset: open)")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model's value)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, metavar="N",
                   help="refuse request bodies over N bytes with 413 (default 1 MiB)")
    p.add_argument("--output", help="append every result to this JSONL file, with the activations of requests that "
                   "capture in <stem>.activations/ beside it (responses say where); needed to capture")
    p.add_argument("--vectors", metavar="DIR", help="the playground's vector picker lists the vector files under DIR")
    p.add_argument("--drain-timeout", type=float, default=300.0, metavar="S",
                   help="on SIGTERM, wait at most S seconds for requests in flight (default 300)")
    p.add_argument("--trace", metavar="DIR", help="write the engine core's loop timeline to DIR/core<N>.jsonl (what "
                   "each step launched and waited on: engine.core.trace)")
    p.add_argument("--log-requests", action="store_true", help="log each HTTP request (uvicorn's access log)")
    add_engine_args(p)
    return p


def serve_main(argv: list[str] | None = None) -> int:
    with interrupt_on_signals():
        try:
            return _serve(serve_parser().parse_args(argv))
        except (ConfigError, ModelNotFound, OutputError, EngineError) as exc:
            print(f"engine-serve: {exc}", file=sys.stderr)
            return EXIT_FATAL
        except KeyboardInterrupt:
            print("engine-serve: stopped", file=sys.stderr)
            return EXIT_OK


def _serve(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="engine-serve: %(message)s")
    try:
        import uvicorn

        from engine.apps.serve.app import ServeSettings, create_app
        from engine.apps.serve.hub import EngineHub
    except ImportError as exc:
        print(f"engine-serve: {exc.name} is missing; install the server's extra: pip install 'steer-engine[serve]'",
              file=sys.stderr)
        return EXIT_FATAL
    if args.max_request_bytes < 1024:
        raise ConfigError(f"--max-request-bytes {args.max_request_bytes}: give at least 1024")
    if not args.drain_timeout >= 0:  # NaN too
        raise ConfigError(f"--drain-timeout {args.drain_timeout}: give the seconds to wait on SIGTERM, 0 or more")
    if args.vectors and not Path(args.vectors).is_dir():
        raise ConfigError(f"--vectors {args.vectors}: not a folder; give the folder holding the playground's vectors")
    config = config_from_args(args)
    if args.trace:
        config = dataclasses.replace(config, trace_dir=args.trace)
    sock = _bind(args.host, args.port)
    lock, writer = None, None
    started = time.perf_counter()
    if args.output:
        from engine.pipeline.writer import JsonlWriter

        output = Path(args.output)
        check_output_path(output)
        lock = lock_output(output)
    try:
        with Engine(config) as engine:
            if args.output:
                writer = JsonlWriter(output, manifest_of(config), ordered=False)
            hub = EngineHub(engine, decoding_tokenizer(engine.source.tokenizer_dir, config.cache_dir), writer)
            name = args.served_model_name or config.model
            app = create_app(hub, ServeSettings(name, args.api_key, args.max_request_bytes, args.vectors))
            server = _server_class(uvicorn)(uvicorn.Config(app, log_level="warning", access_log=args.log_requests,
                                                   timeout_graceful_shutdown=args.drain_timeout, lifespan="off"))
            host, port = sock.getsockname()[:2]
            print(f"engine-serve: serving {name!r} on {engine.device} ({engine.dtype}) at http://{host}:{port} "
                  f"(ready in {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
            try:
                server.run(sockets=[sock])  # until SIGTERM or Ctrl-C, then drained (timeout_graceful_shutdown)
            finally:
                hub.close()
                if writer is not None:
                    writer.close()
        print(f"engine-serve: stopped; {hub.num_served} request(s) served", file=sys.stderr)
        return EXIT_OK
    finally:
        sock.close()
        if lock is not None:
            lock.release()


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's (SIGINT, SIGTERM: drain and stop; a second one: stop now), without raising the signal again
            once drained: engine-serve goes on to end its engine and say so."""
            with stop_signals(self.handle_exit):
                yield

    return Server


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the engine starts: a port in use is said at once, not after start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another port "
                          f"(--port 0 takes a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def main() -> None:
    """The engine-serve command: serve_main, then end without the interpreter's teardown (as engine-run does). The
    server's objects hold the engine's queues in reference cycles: collected first, so their semaphores are
    freed (the resource tracker would warn of them as leaked)."""
    code = serve_main()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
