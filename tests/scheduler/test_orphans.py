"""kill -9 of a tuning job leaves no process behind (issue 11 item 5): shard workers, forkservers,
builders, runners and resource trackers die with the job."""

import os
import signal
import subprocess
import sys
import time

import psutil


def _descendants_after_start(p: subprocess.Popen, want: int, timeout_s: float = 120) -> list[psutil.Process]:
    """Wait until the job has at least `want` descendants (workers are building), return them all."""
    me = psutil.Process(p.pid)
    deadline = time.time() + timeout_s
    seen: dict[int, psutil.Process] = {}
    while time.time() < deadline:
        for c in me.children(recursive=True):
            seen.setdefault(c.pid, c)
        if len(seen) >= want:
            time.sleep(1.0)  # let the builders start too
            for c in me.children(recursive=True):
                seen.setdefault(c.pid, c)
            return list(seen.values())
        assert p.poll() is None, "the job ended before its workers started"
        time.sleep(0.2)
    raise AssertionError(f"only {len(seen)} descendants after {timeout_s} s")


def test_kill_9_of_a_parallel_job_leaves_no_process(tmp_path):
    cmd = [sys.executable, "-m", "shapetune.cli", "tune", "--target", "llvm", "--shape", "m=64,n=64,k=64",
           "--shape", "m=48,n=64,k=64", "--no-bias", "--trials", "64", "--batch", "4",
           "--template", "gemm_llvm", "--workers", "2", "--db", str(tmp_path / "t.db")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, SHAPETUNE_BUILD_JOBS="2"))
    try:
        # 2 shard workers, each with a forkserver and at least one pool process under it
        kids = _descendants_after_start(p, want=6)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    gone, alive = psutil.wait_procs(kids, timeout=10)
    left = [f"{c.pid} {c.cmdline()[:4]}" for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for c in alive:
        c.kill()
    assert not left, f"{len(left)} of {len(kids)} processes outlived the job: {left}"
