"""Run the GPU tests file by file, each in its own pytest process under its own time limit, and print one
line per file: a hang or a slow file then costs only its own limit, and every other file's result is kept
(one pytest over all of them, cut by an outer `timeout`, loses its whole summary).

    python scripts/run_gpu_tests.py                          # every test file that uses the gpu marker
    python scripts/run_gpu_tests.py --limit 120 --json gpu_tests.json tests/kernels/test_pack_gpu.py

A file past its limit gets SIGINT first (pytest then prints what ran), SIGKILL 15 s later. Exit status 1 if
any file failed, errored or ran out of time. Without a GPU every file reports its tests skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"=+ (.*?) in [\d.]+s")


def gpu_test_files(root: Path = REPO / "tests") -> list[Path]:
    """Test files that use the gpu marker, in path order."""
    return sorted(p for p in root.rglob("test_*.py") if "mark.gpu" in p.read_text())


def run_file(path: Path, limit_s: float, log_dir: Path | None = None) -> dict:
    """One file in its own pytest process: {"file", "outcome", "summary", "seconds", "failed"}; its whole
    output also to log_dir/<file name>.log where given (tracebacks of a run on a machine that is gone)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfE", str(path)]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out = False
    try:
        out, _ = p.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        p.send_signal(2)  # SIGINT: pytest stops and prints its summary
        try:
            out, _ = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{path.stem}.log").write_text(out)
    sums = SUMMARY.findall(out)
    summary = sums[-1] if sums else (out.strip().splitlines() or ["no output"])[-1][:200]
    failed = [line.split(" ", 1)[1][:200] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if timed_out:
        outcome = "timeout"
    elif p.returncode in (0, 5):  # 5: nothing collected (every test deselected)
        outcome = "ok"
    else:
        outcome = "failed"
    return {"file": os.path.relpath(path, REPO), "outcome": outcome, "summary": summary,
            "seconds": round(time.monotonic() - t0, 1), "failed": failed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="test files (default: every file using the gpu marker)")
    ap.add_argument("--limit", type=float, default=180, help="seconds per file")
    ap.add_argument("--json", default="")
    ap.add_argument("--logs", default="", help="folder for each file's whole pytest output")
    a = ap.parse_args(argv)
    files = [Path(f).resolve() for f in a.files] or gpu_test_files()
    rows = []
    for f in files:
        r = run_file(f, a.limit, Path(a.logs) if a.logs else None)
        rows.append(r)
        print(f"{r['outcome']:8s} {r['seconds']:7.1f} s  {r['file']}: {r['summary']}", flush=True)
        for line in r["failed"]:
            print(f"         {line}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    return int(any(r["outcome"] != "ok" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
