"""The engine in its own thread, and the asyncio side that adds, streams and aborts requests.

The engine is not thread-safe and each `step()` is a device call, so one thread owns it: it takes
commands (add, abort, stop) from a queue between steps, steps while anything is unfinished, and
hands each step's outputs to the event loop in one `call_soon_threadsafe`. The event loop never
waits on the device: adding a request waits only for the engine thread to take the command
(at most one step), and an abort takes effect before the next step.
"""
import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from jllm.engine import QueueFull

log = logging.getLogger("jllm.serve")


class EngineUnavailable(RuntimeError):
    """The engine thread is not running (stopped, or failed with the error given)."""


class RequestStream:
    """The outputs of one request as they arrive; iteration ends after the finished output."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator:
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


class EngineRunner:
    """Runs `engine` (the jllm.engine.Engine API) in a thread; used from one event loop."""

    def __init__(self, engine):
        self.engine = engine
        self.stats = None                 # the latest engine.stats(), refreshed after each step
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}   # touched only on the event loop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False              # the engine thread has ended: no command is taken any more
        self._lock = threading.Lock()     # orders a command's put against that end

    # --- event-loop side --------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine runner is already started")
        self._loop = loop
        self.stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="jllm-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def in_flight(self) -> int:
        """Requests added and not yet finished."""
        return len(self._streams)

    async def add(self, request_id: str, prompt: list[int] | str, params) -> RequestStream:
        """Add a request; its outputs come from the returned stream.

        Raises what engine.add_request raises (ValueError, TypeError, QueueFull) and
        EngineUnavailable when the engine thread is not running.
        """
        [stream] = await self.add_many([(request_id, prompt, params)])
        return stream

    async def add_many(self, requests: list[tuple[str, list[int] | str, object]]) -> list[RequestStream]:
        """Add (request_id, prompt, params) requests at once, all or none (Engine.add_requests):
        one stream each, in order. Raises as `add`."""
        if not self.alive:
            raise EngineUnavailable(f"the engine is not running ({self.error!r})" if self.error
                                    else "the engine is not running")
        ids = [r[0] for r in requests]
        taken = next((i for i in ids if i in self._streams), None)
        if taken is not None or len(set(ids)) < len(ids):
            raise ValueError(f"request_id={taken or ids!r} is already in use")
        streams = [RequestStream(i) for i in ids]
        self._streams.update(zip(ids, streams))  # before the engine can produce anything for them
        added = self._loop.create_future()
        with self._lock:  # a thread that ends after this put refuses the add (_close)
            if self._closed:
                for i in ids:
                    del self._streams[i]
                raise EngineUnavailable(f"the engine is not running ({self.error!r})" if self.error
                                        else "the engine is not running")
            self._commands.put(("add", requests, added))
        try:
            await added
        except asyncio.CancelledError:  # the client left while the add was queued
            for i in ids:
                self._streams.pop(i, None)
                self._commands.put(("abort", i))  # after the add: the queue is FIFO
            raise
        except BaseException:
            for i in ids:
                self._streams.pop(i, None)
            raise
        return streams

    def abort(self, request_id: str) -> None:
        """Abort a request if it is still running; its final output has finish_reason "abort"."""
        if request_id in self._streams:
            self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread after its current step; unfinished streams end with an error."""
        if self._thread is None:
            return
        self._commands.put(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout_s)
        self._fail_all(EngineUnavailable("the server is shutting down"))

    def _deliver(self, outputs: list) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # --- engine thread ----------------------------------------------------------------------

    def _post(self, fn, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False

    def _run(self) -> None:
        live: set[str] = set()   # ids the engine holds and has not finished
        commands: list = []      # taken from the queue and not yet carried out
        error: BaseException = EngineUnavailable("the engine is not running (stopped)")
        try:
            while True:
                block = not self.engine.has_unfinished()
                commands = [self._commands.get()] if block else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                while commands:
                    command = commands.pop(0)
                    if command[0] == "stop":
                        return
                    self._command(command, live)
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    live.difference_update(o.request_id for o in outputs if o.finished)
                    if outputs and not self._post(self._deliver, outputs):
                        return
                self.stats = self.engine.stats()
        except Exception as e:  # an engine failure: every request gets an error, health says so
            log.exception("the engine failed; no more requests are served")
            self.error = e
            error = EngineUnavailable(f"the engine failed: {e!r}")
            self._post(self._fail_all, error)
        finally:
            self._close(commands, error)

    def _close(self, commands: list, error: BaseException) -> None:
        """The thread ends: every add it did not carry out (taken, or still queued) gets `error`,
        so no client waits on it; adds after this are refused in `add`."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        for command in commands:
            if command[0] == "add":
                self._post(self._resolve, command[-1], error)

    def _command(self, command: tuple, live: set[str]) -> None:
        if command[0] == "abort":
            if command[1] in live:
                self.engine.abort(command[1])
            return
        _, requests, future = command
        error = None
        try:
            live.update(self.engine.add_requests([(prompt, params, rid) for rid, prompt, params in requests]))
        except (ValueError, TypeError, QueueFull) as e:   # the request's fault, or a full queue
            error = e
        except Exception as e:  # the engine's fault: this request fails, the engine carries on
            log.exception("add_request failed for %s", [r[0] for r in requests])
            error = e
        self._post(self._resolve, future, error)
