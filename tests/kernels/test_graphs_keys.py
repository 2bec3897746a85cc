"""kernels.graphs' choices that need no GPU: how many warm-up runs a capture gets. A LoRA switch (a
signature already captured under another PEFT adapter state) takes `rewarmup` runs; a new shape, or a
module whose graphs were dropped, takes `warmup`. The captures themselves are tested on the GPU
(tests/kernels/test_graphs_gpu.py)."""

from __future__ import annotations

from torch import nn

from kernels.graphs import GraphedCall


def _key(shape, adapters):
    return ("spec", ((shape, "float16", "cuda:0"),), adapters)


def test_a_signature_captured_under_another_adapter_state_skips_the_warmups():
    g = GraphedCall(nn.Linear(4, 4), warmup=2)
    assert g._warmups_for(_key((2, 4), (("a",),))) == 2  # nothing captured yet
    g.graphs[_key((2, 4), (("a",),))] = object()  # a captured graph (any non-str entry)
    assert g._warmups_for(_key((2, 4), (("b",),))) == 0  # same tensors, other adapter: a LoRA switch
    assert g._warmups_for(_key((1, 4), (("b",),))) == 2  # a new shape
    g.graphs[_key((3, 4), (("a",),))] = "capture_failed"  # a signature that never captured proves nothing
    assert g._warmups_for(_key((3, 4), (("b",),))) == 2
    g.graphs.clear()  # what a weight-storage or tree change does
    assert g._warmups_for(_key((2, 4), (("b",),))) == 2
    assert GraphedCall(nn.Linear(4, 4), warmup=2, rewarmup=5).rewarmup == 2  # never more than warmup
    g.uninstall()
