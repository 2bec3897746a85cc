"""scheduler/workspaces.py: a GPU kernel's global scratch buffers as arguments the caller allocates.

TVM's own workspace pool frees a page and allocates a larger one when a request outgrows it, so a CUDA
graph that captured a kernel using the old page would replay on freed memory (SD captured at 512², then
run at 768²). Here: the lifted module takes them as arguments (no TVMBackendAllocWorkspace left), the
wrapper computes their shapes from the call's symbolic dims and gives correct results at two sizes of one
bucket (llvm, run for real; float64 reference, output poisoned); an sm_90 build writes the spec; malformed
specs are refused.
"""

from __future__ import annotations

import json

import pytest
import torch

from scheduler import workspaces
from scheduler.verify import check_output
from shapetune.ops import opdef
from shapetune.ops.norm import group_norm_workload
from shapetune.target import cuda_target, detect


def _lifted_llvm(w, tmp_path):
    import tvm

    from scheduler import templates

    tgt = detect("llvm")
    t = templates.get("dlight")
    mod, spec = workspaces.lift(t.apply(w, tgt, t.space(w, tgt)[0]))
    with tgt.tvm_target():
        lib = tvm.compile(mod, target=tgt.tvm_target())
    return lib, spec


def test_lifted_scratch_buffers_are_arguments_sized_per_call(tmp_path):
    w = group_norm_workload(2, 96, 64, 8, "float32", silu=True, hw_range=(65, 128))
    lib, spec = _lifted_llvm(w, tmp_path)
    assert spec is not None and spec["dims"]["hw"] == [0, 1]
    assert "TVMBackendAllocWorkspace" not in lib.mod.inspect_source("ll")
    assert any(["var", "hw"] in b["shape"] for b in spec["buffers"])  # a buffer sized by the call's hw
    so = tmp_path / "k.so"
    lib.export_library(str(so))
    workspaces.write_spec(so, spec)
    from scheduler.loader import load_function

    fn = load_function(str(so), False)
    assert isinstance(fn, workspaces.WithWorkspaces)
    od = opdef("group_norm")
    for hw in (65, 128):  # the bucket's bounds: scratch shapes differ per call
        wl = group_norm_workload(2, hw, 64, 8, "float32", silu=True)
        ins = od.inputs(wl, "cpu", torch.Generator().manual_seed(hw))
        before = [t.clone() for t in ins]
        out = od.output(wl, "cpu").fill_(float("nan"))
        fn(*ins, out)
        chk = check_output(out, od.reference(wl, ins), "float32")
        assert chk.ok, (hw, chk.reason)
        assert all(torch.equal(a, b) for a, b in zip(ins, before))
    assert len(fn._shapes) == 2


def test_an_sm90_build_writes_its_spec_and_leaves_no_tvm_workspace(tmp_path):
    from scheduler.builder import build_one
    from scheduler import templates

    tgt = cuda_target()
    w = group_norm_workload(4, 4096, 320, 32, silu=True, n_range=(3, 4), hw_range=(2049, 4096))
    t = templates.get("norm_cuda_split_bucket")
    cand = next(c for c in t.space(w, tgt) if c.knob["split"] == 8 and c.knob["vec_s"] == 2)
    path, _ = build_one(w.to_json(), tgt.to_json(), cand.to_json(), str(tmp_path))
    assert path.endswith(f"-abi{__import__('scheduler.builder').builder.ABI}.so")
    assert b"TVMBackendAllocWorkspace" not in open(path, "rb").read()
    spec = workspaces.read_spec(path)
    assert spec is not None and [dt for dt, _ in spec["buffers"]] == ["float32"]
    (_, shape), = spec["buffers"]
    env = {"n": 3, "hw": 3000}
    assert [workspaces._eval(s, env) for s in shape] == [8, 3, 32, 2]  # [S, n, g, {sum, sum of squares}]


@pytest.mark.parametrize("bad", [
    {"version": 2, "dims": {}, "buffers": []},
    {"version": 1, "dims": {"n": [0, 0]}, "buffers": [{"name": "p", "dtype": "float32", "shape": [["pow", 2, 3]]}]},
    {"version": 1, "dims": {"n": [0, 0]}, "buffers": [{"name": "p", "dtype": "float32", "shape": [["var", "m"]]}]},
    {"version": 1, "dims": {}, "buffers": [{"name": "p", "dtype": "float32", "shape": [True]}]},
    {"version": 1, "buffers": []},
], ids=["version", "op", "undeclared_dim", "bool", "no_dims"])
def test_malformed_specs_are_refused(tmp_path, bad):
    so = tmp_path / "k.so"
    workspaces.spec_path(so).write_text(json.dumps(bad))
    with pytest.raises(workspaces.WorkspaceError):
        workspaces.read_spec(so)
    workspaces.spec_path(so).write_text("{not json")
    with pytest.raises(workspaces.WorkspaceError):
        workspaces.read_spec(so)
