"""Patch: SIGTERM under load shuts the server down instead of hanging on in-flight requests
(targets vLLM 0.32.0).

Bug: on SIGTERM the API server calls ``AsyncLLM.shutdown`` (engine core stopped, output
handler task cancelled) and then uvicorn waits, with no timeout, for every open connection to
close. A request still waiting for engine output is told nothing: its handler awaits its
output queue forever, the API server process never exits, and the client hangs until its own
timeout. Whether the dying engine's error reaches the queues first is a race; on the CPU
machine it was lost every time after earlier client aborts (measured: still running 40 s
after SIGTERM, then exit only once the clients gave up).

Fix: after upstream's shutdown, put ``EngineDeadError`` into the output queue of every
request still pending (on the event loop that owns the queues), as the output handler does
when the engine dies. Their handlers finish at once with an error response (HTTP 500 / an
error event on a stream, as for any engine death), uvicorn sees the connections close and
the process tree exits. Engines other than TiDAR's benefit the same way.
"""

from __future__ import annotations

import functools

from ._upstream import require_params

TARGET_VERSION = "0.32.0"
EXPECTED_PARAMS = ["self", "timeout"]
_ATTR = "_vllm_tidar_patched"


def check_upstream() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    require_params("shutdown_fails_pending_requests", TARGET_VERSION, "AsyncLLM.shutdown", AsyncLLM.shutdown,
                   EXPECTED_PARAMS)


def fail_pending_requests(llm) -> None:
    """Hand ``EngineDeadError`` to every pending request of ``llm`` (an ``AsyncLLM``)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    processor = getattr(llm, "output_processor", None)
    if processor is None or not processor.request_states:
        return
    handler = getattr(llm, "output_handler", None)
    loop = handler.get_loop() if handler is not None else None
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(processor.propagate_error, EngineDeadError())
    else:
        processor.propagate_error(EngineDeadError())


def apply() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    shutdown = AsyncLLM.shutdown
    if getattr(shutdown, _ATTR, False):
        return
    check_upstream()

    @functools.wraps(shutdown)
    def patched_shutdown(self, timeout=None):
        shutdown(self, timeout=timeout)
        fail_pending_requests(self)

    setattr(patched_shutdown, _ATTR, True)
    AsyncLLM.shutdown = patched_shutdown
