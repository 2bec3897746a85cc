"""Every op's float64 reference is computed where its inputs are, and the verdict too.

A bucket's largest verification members are 10^7-10^8 elements (group_norm at 8 x 128² x 320): their
reference and output check took seconds each on the CPU (about 4 s per member on this 2-core machine),
times 5 members, for every candidate of a tuning run. On the GPU they take milliseconds. Inputs on
the meta device stand in for a GPU here: a reference that still moved its operands to the CPU fails
("Cannot copy out of meta tensor")."""

from __future__ import annotations

import pytest
import torch

from scheduler.verify import check_output
from shapetune.ops import OPS, opdef
from shapetune.ops.attention import attention_workload
from shapetune.ops.conv import conv2d_workload
from shapetune.ops.elementwise import bias_add_workload, gelu_gate_workload
from shapetune.ops.geglu import geglu_workload
from shapetune.ops.linear import linear_workload
from shapetune.ops.norm import add_layer_norm_workload, group_norm_workload, layer_norm_workload

WORKLOADS = [
    linear_workload(37, 24, 40, "float16", True), linear_workload(13, 16, 8, "float16", epilogue=("bias", "residual")),
    linear_workload(13, 16, 8, "float16", epilogue=("bias", "gelu")), geglu_workload(37, 24, 16, "float16"),
    gelu_gate_workload(37, 24, "float16"), bias_add_workload(3, 45, 16, "float16", ("residual",)),
    bias_add_workload(3, 45, 16, "float16", ("shift",)), bias_add_workload(3, 45, 16, "float16", ()),
    group_norm_workload(3, 45, 16, 4, "float16", silu=True), layer_norm_workload(37, 48, "float16"),
    conv2d_workload(3, 8, 8, 16, 16, 3, 3, 1, 1, "float16"), attention_workload(3, 45, 20, 2, 8, "float16"),
    add_layer_norm_workload(37, 48, "float16"),
]


def test_every_op_is_covered():
    opdef("linear")  # loads every family
    assert set(OPS) <= {w.op for w in WORKLOADS}


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.name)
def test_the_reference_stays_on_the_inputs_device(w):
    od = opdef(w.op)
    ins = od.inputs(w, "cpu", torch.Generator().manual_seed(0))
    ref = od.reference(w, [t.to("meta") for t in ins])
    want = od.output(w, "cpu")
    assert ref.device.type == "meta" and ref.dtype == torch.float64 and ref.shape == want.shape
    on_cpu = od.reference(w, ins)  # and on the CPU, the same computation
    assert on_cpu.device.type == "cpu" and on_cpu.dtype == torch.float64 and torch.isfinite(on_cpu).all()


def test_check_output_judges_on_the_reference_device():
    """The output comes to the reference (not both to the CPU): a CPU reference still judges, and the
    verdict is unchanged."""
    ref = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert check_output(ref.half(), ref, "float16").ok
    bad = ref.half()
    bad[5, 7] += 1.0
    chk = check_output(bad, ref, "float16")
    assert not chk.ok and "first at (5, 7)" in chk.reason
