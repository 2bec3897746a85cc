"""Top-level functions for IsolatedPool tests (workers import them by name, so they live here)."""

import faulthandler
import os
import signal
import time


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


def dispatch(kind, arg):
    """One function, many behaviours: lets a single batch mix good and bad slots."""
    return {"square": square, "boom": raise_boom, "exit": exit_hard, "segv": lambda _: segfault(),
            "sleep": lambda s: sleep_then(s, "woke")}[kind](arg)


def pid():
    return os.getpid()


def raise_timeout(what):
    raise TimeoutError(f"{what} timed out")  # the function's own failure, not a hung worker
