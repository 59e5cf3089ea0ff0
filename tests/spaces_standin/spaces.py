"""A stand-in for Hugging Face's `spaces` package, for a Space-like start in the tests (the real ZeroGPU service
runs only on Hugging Face). Faithful where it matters to the app: `spaces.GPU(duration=...)` runs each call of
the decorated function in a worker process forked from the app's process (as ZeroGPU does), never in the app's
own threads; a generator function's items and a raised exception come back pickled through a pipe; the
duration is computed from the call's arguments before the call. Each call appends a line to the file named by
SPACES_STANDIN_LOG: the worker's pid, the app's pid, the duration asked for.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import pickle

_FORK = multiprocessing.get_context("fork")


def _log(line: str) -> None:
    path = os.environ.get("SPACES_STANDIN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _worker(fn, args, kwargs, conn, parent: int, seconds, inherited) -> None:
    inherited.close()  # the fork's copy of the app's read end: else a gone app never breaks the pipe
    _log(f"worker={os.getpid()} app={parent} duration={seconds}")
    try:
        if inspect.isgeneratorfunction(fn):
            for item in fn(*args, **kwargs):
                conn.send(("item", pickle.dumps(item)))
        else:
            conn.send(("item", pickle.dumps(fn(*args, **kwargs))))
        conn.send(("end", None))
    except BaseException as e:  # noqa: BLE001 - sent back as ZeroGPU does
        try:
            conn.send(("error", pickle.dumps(e)))
        except OSError:  # the app is gone (it stopped reading): nothing to tell
            pass
    finally:
        conn.close()
        os._exit(0)  # a forked worker leaves without running the app's exit handlers


def _run(fn, duration, args, kwargs):
    seconds = duration(*args, **kwargs) if callable(duration) else duration
    pickle.dumps((args, kwargs))  # ZeroGPU sends the arguments to its worker: they must pickle
    receive, send = _FORK.Pipe(duplex=False)
    process = _FORK.Process(target=_worker, args=(fn, args, kwargs, send, os.getpid(), seconds, receive),
                            daemon=True)
    process.start()
    send.close()
    try:
        while True:
            kind, payload = receive.recv()
            if kind == "end":
                return
            value = pickle.loads(payload)
            if kind == "error":
                raise value
            yield value
    finally:
        receive.close()
        process.join(timeout=30)


def GPU(fn=None, duration=60):  # noqa: N802 - the real package's name
    def wrap(f):
        if inspect.isgeneratorfunction(f):
            @functools.wraps(f)
            def call(*args, **kwargs):
                yield from _run(f, duration, args, kwargs)
        else:
            @functools.wraps(f)
            def call(*args, **kwargs):
                return next(_run(f, duration, args, kwargs), None)
        return call

    return wrap(fn) if fn is not None else wrap
