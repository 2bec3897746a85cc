"""scripts/run_gpu_tests.py: one pytest process per file under its own limit; a file that runs past it is
reported as a timeout with what it ran, a failing one as failed, and the others keep their results."""

from __future__ import annotations

import json

from tests._scripts import script

rg = script("run_gpu_tests")

BODY = '''
import time
import pytest

pytestmark = pytest.mark.gpu


def test_{name}():
    {stmt}
'''


def test_files_each_keep_their_outcome(tmp_path, capsys):
    files = {}
    for name, stmt in (("passes", "assert True"), ("fails", "assert 1 == 2"), ("hangs", "time.sleep(60)")):
        files[name] = tmp_path / f"test_{name}_gpu.py"
        files[name].write_text(BODY.format(name=name, stmt=stmt))
    (tmp_path / "conftest.py").write_text('def pytest_configure(config):\n'
                                          '    config.addinivalue_line("markers", "gpu: test")\n')
    rc = rg.main(["--limit", "8", "--json", str(tmp_path / "out.json"), "--logs", str(tmp_path / "logs"),
                  *(str(files[n]) for n in ("hangs", "fails", "passes"))])
    out = capsys.readouterr().out
    assert rc == 1 and len(out.splitlines()) >= 3  # a line per file (and the failure under it)
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in json.loads((tmp_path / "out.json").read_text())["rows"]}
    assert rows["test_passes_gpu.py"]["outcome"] == "ok" and "1 passed" in rows["test_passes_gpu.py"]["summary"]
    assert rows["test_fails_gpu.py"]["outcome"] == "failed" and rows["test_fails_gpu.py"]["failed"]
    assert rows["test_hangs_gpu.py"]["outcome"] == "timeout" and rows["test_hangs_gpu.py"]["seconds"] < 40
    assert "assert 1 == 2" in (tmp_path / "logs" / "test_fails_gpu.log").read_text()  # the whole traceback


def test_the_default_files_are_the_gpu_marked_ones():
    names = {p.name for p in rg.gpu_test_files()}
    assert {"test_graphs_gpu.py", "test_pack_gpu.py", "test_runner.py"} <= names
    assert "test_registry.py" not in names
