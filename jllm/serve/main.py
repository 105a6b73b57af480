"""Running the server: uvicorn on a socket we bind, request logs, graceful shutdown on signals.

SIGTERM or SIGINT starts a drain: new requests get 503 while the listening socket stays open,
requests in flight run to completion, and once none is left (or --shutdown-timeout has passed,
and the stragglers have been aborted) uvicorn stops and `serve` returns 0. A second signal
stops at once.
"""
import datetime
import json
import logging
import signal
import socket
import sys
import time

import uvicorn

from jllm.serve.app import ServerState

log = logging.getLogger("jllm.serve")
ABORT_GRACE_S = 2.0   # after aborting the stragglers, how long their responses get to finish


class _Formatter(logging.Formatter):
    """One line per record: text with key=value fields, or a JSON object (--log-json)."""

    def __init__(self, json_lines: bool):
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        if self.json_lines:
            line = {"time": when.isoformat(timespec="milliseconds"), "level": record.levelname,
                    "logger": record.name, "message": record.getMessage(), **fields}
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
            return json.dumps(line, ensure_ascii=False, default=str)
        text = f"{when:%Y-%m-%d %H:%M:%S} {record.levelname} {record.getMessage()}"
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(json_lines: bool, stream=None) -> None:
    """Our logger and uvicorn's write through one handler, as text lines or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(json_lines))
    for name in ("jllm.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


class Server(uvicorn.Server):
    """uvicorn's server with a drain on SIGTERM/SIGINT instead of an immediate stop."""

    def __init__(self, config: uvicorn.Config, state: ServerState, runner, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.runner, self.shutdown_timeout = state, runner, shutdown_timeout
        self.drain_deadline: float | None = None
        self.aborted_at: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's: it re-raises the signal after shutting down, which would make the exit
        # status 143 (SIGTERM) or a KeyboardInterrupt instead of 0.
        if self.drain_deadline is not None:
            log.info("second signal: stopping now")
            self.should_exit = self.force_exit = True
            return
        log.info("%s: refusing new requests, finishing %d in flight (up to %g s)",
                 signal.Signals(sig).name, self.state.in_flight, self.shutdown_timeout)
        self.start_drain()

    def start_drain(self) -> None:
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is None:
            return await super().on_tick(counter)
        if self.state.in_flight == 0:
            return True
        now = time.monotonic()
        if now >= self.drain_deadline and self.aborted_at is None:
            log.info("shutdown timeout: aborting %d requests still in flight", self.state.in_flight)
            self.runner.abort_all()
            self.aborted_at = now
        if self.aborted_at is not None and now >= self.aborted_at + ABORT_GRACE_S:
            return True
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app, sock: socket.socket, shutdown_timeout: float = 30.0) -> Server:
    """A Server for `app` (from create_app) on the bound socket; `.run(sockets=[sock])` serves."""
    if not shutdown_timeout >= 0:
        raise ValueError(f"{shutdown_timeout=} must be >= 0")
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(ABORT_GRACE_S) + 1,
                            timeout_keep_alive=5)
    return Server(config, app.state.serve, app.state.runner, shutdown_timeout)


def serve(app, sock: socket.socket, *, shutdown_timeout: float = 30.0) -> int:
    """Serve `app` (from create_app) on a bound socket until a signal drains it; returns 0."""
    server = make_server(app, sock, shutdown_timeout)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d", host, port, extra={"fields": {"host": host, "port": port}})
    server.run(sockets=[sock])
    log.info("stopped")
    return 0
