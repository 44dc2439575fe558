"""The feedback app served in a thread for the simulated crowd (and /admin/loop)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kilter.errors import KilterError


@contextmanager
def serve_in_thread(db: str, loop_dir: str | None = None, order_seed: int | None = None) -> Iterator[str]:
    """The feedback app on a free localhost port for as long as the block runs; yields its base URL.

    ``order_seed`` makes the app's left/right shuffles reproducible (the crowd's labels then repeat within a seed).
    """
    import uvicorn

    from kilter.feedback.app import create_app
    from kilter.feedback.settings import ServeConfig

    app = create_app(ServeConfig(db=db, log_level="warning", loop_dir=loop_dir, order_seed=order_seed))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="kilter-loop-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise KilterError("the feedback app did not start in a thread (see the log above)")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
