"""Top-level functions for IsolatedPool tests (workers import them by name, so they live here)."""

import faulthandler
import os
import signal
import time
from pathlib import Path


class Boom(ValueError):
    pass


def square(x):
    return x * x


def raise_boom(msg):
    raise Boom(msg)


def exit_hard(code=1):
    os._exit(code)


def segfault():
    faulthandler.disable()  # pytest enables it; a forked child would print its traceback
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)  # the signal is delivered at once; never reached


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def meet(folder, name, n, wait_s=30.0):
    """A rendezvous of `n` calls: note this one's arrival in `folder`, then wait until `n` have
    arrived. True when they all did within `wait_s` (they ran at the same time), False when not (they
    ran one after the other: no call can see a later one arrive)."""
    Path(folder, str(name)).touch()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if len(os.listdir(folder)) >= n:
            return True
        time.sleep(0.02)
    return False


def noted_segfault(path):
    """A segfault that first appends a line to `path`: the file counts how often it was run."""
    with open(path, "a") as f:
        f.write("ran\n")
    segfault()


def dispatch(kind, arg):
    """One function, many behaviours: lets a single batch mix good and bad slots."""
    return {"square": square, "boom": raise_boom, "exit": exit_hard, "segv": lambda _: segfault(),
            "sleep": lambda s: sleep_then(s, "woke"), "meet": lambda a: meet(*a),
            "noted_segv": noted_segfault}[kind](arg)


def pid():
    return os.getpid()


def raise_timeout(what):
    raise TimeoutError(f"{what} timed out")  # the function's own failure, not a hung worker
