"""kernels.graphs' choices that need no GPU: how many warm-up runs a capture gets (a LoRA switch, a
signature already captured under another PEFT adapter state, takes `rewarmup` runs; a new shape, or a
module whose graphs were dropped, takes `warmup`), and what a graph baked in (an attention's processor).
The captures themselves are tested on the GPU (tests/kernels/test_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels

from kernels.graphs import GraphedCall


def _key(shape, adapters, autocast=None):
    return ("spec", ((shape, "float16", "cuda:0"),), adapters, autocast)


def test_a_signature_captured_under_another_adapter_state_skips_the_warmups():
    g = GraphedCall(nn.Linear(4, 4), warmup=2)
    assert g._warmups_for(_key((2, 4), (("a",),))) == 2  # nothing captured yet
    g.graphs[_key((2, 4), (("a",),))] = object()  # a captured graph (any non-str entry)
    assert g._warmups_for(_key((2, 4), (("b",),))) == 0  # same tensors, other adapter: a LoRA switch
    assert g._warmups_for(_key((2, 4), (("b",),), torch.float16)) == 2  # under autocast: other kernels
    assert g._warmups_for(_key((1, 4), (("b",),))) == 2  # a new shape
    g.graphs[_key((3, 4), (("a",),))] = "capture_failed"  # a signature that never captured proves nothing
    assert g._warmups_for(_key((3, 4), (("b",),))) == 2
    g.graphs.clear()  # what a weight-storage or tree change does
    assert g._warmups_for(_key((2, 4), (("b",),))) == 2
    assert GraphedCall(nn.Linear(4, 4), warmup=2, rewarmup=5).rewarmup == 2  # never more than warmup
    g.uninstall()


def test_a_new_attention_processor_changes_what_the_graphs_were_baked_against():
    """Defect (before: not part of the state): an attention processor that is no nn.Module is a plain
    attribute to diffusers, so `set_attn_processor` after a capture changed nothing a GraphedCall looked at
    and its replays kept running the old processor. Now the processors are part of the baked state: a
    change drops the graphs (re-captured on the next call), as a replaced parameter does."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    from ._tiny_unet import pair

    _, unet = pair()
    g = GraphedCall(unet)
    before = g._state()
    assert g._state() == before  # nothing changed: the same state
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.set_processor(AttnProcessor2_0())  # no nn.Module: no registration hook fires
    assert g._state() != before
    # an IP-Adapter processor's scales, which set_ip_adapter_scale writes into its list in place
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn2.set_processor(IPAdapterAttnProcessor2_0(attn2.inner_dim, attn2.cross_attention_dim, scale=1.0))
    with_ip = g._state()
    attn2.processor.scale[0] = 0.5
    assert g._state() != with_ip
    g.uninstall()


def test_freeu_and_vae_tiling_change_what_the_graphs_were_baked_against():
    """Defect (before: not part of the state): FreeU's factors (set on the UNet's up blocks by
    enable_freeu, read by their forwards) and a VAE's tiling / slicing flags are plain attributes; set
    after a capture, the replays kept the branch and factors of the capture. Now a change drops the graphs."""
    diffusers = pytest.importorskip("diffusers")
    from scheduler.sd_configs import TINY_VAE

    from ._tiny_unet import pair

    _, unet = pair()
    g = GraphedCall(unet)
    before = g._state()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    on = g._state()
    assert on != before
    unet.disable_freeu()
    assert g._state() != on
    g.uninstall()
    vae = diffusers.AutoencoderKL(**TINY_VAE)
    gv = GraphedCall(vae, "decode")
    before = gv._state()
    vae.enable_tiling()
    assert gv._state() != before
    gv.uninstall()


def test_the_registry_graphs_were_baked_against_stays_alive_with_them(tmp_path):
    """Defect (before: its id only): a registry replaced by kernels.set_registry while graphs captured
    against it lived could be freed, unloading the kernels those graphs launch by handle, and a new
    registry allocated at its address matched the stale id, so the graphs were not dropped. The baked
    state now holds the registry itself."""
    import gc
    import weakref

    from shapetune.target import detect

    old = kernels.Registry(db_path=tmp_path / "a.db", target=detect("llvm"))
    prev = kernels.set_registry(old)
    try:
        g = GraphedCall(nn.Linear(4, 4))
        g._baked = g._state()  # what a capture records
        ref = weakref.ref(old)
        kernels.set_registry(kernels.Registry(db_path=tmp_path / "b.db", target=detect("llvm")))
        del old
        gc.collect()
        assert ref() is not None  # alive while the graphs baked against it are
        assert g._state() != g._baked  # and the new registry is no match
        g.uninstall()
    finally:
        kernels.set_registry(prev)


def test_a_submodule_deleted_then_replaced_changes_the_tree():
    """Defect (before: the tree was its modules' ids): `del model.sub` frees the submodule, and a new one
    assigned after it can be allocated at its address, so the tree of ids looked unchanged and the graphs
    kept replaying the old submodule's weights. The tree now holds its modules (identity compared): the old
    one stays referenced until the tree is refreshed, and the new one is no match."""
    import gc
    import weakref

    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    g = GraphedCall(m)
    before = g._state()
    ref = weakref.ref(m[1])
    del m[1]
    gc.collect()
    assert ref() is not None  # still part of the tree the graphs were baked against
    m.append(nn.Linear(4, 4))
    assert g._state() != before
    g.uninstall()


def test_storage_moved_there_and_back_is_packed_again(empty_registry):
    """`.to()` there and back (e.g. a pipeline moved to the CPU and back) gives every Parameter new storage,
    which breaks the packings (q/k/v, the shared k/v and time-embedding GEMMs: Parameters re-pointed at rows
    of one storage). Before, the model then ran the projections apart for good; now the GraphedCall that
    sees the storage change re-patches, which packs them again before the next capture."""
    from kernels import qkv

    from ._tiny_unet import TOL, inputs, linear_calls, pair

    eager, unet = pair()
    rep = kernels.optimize(unet)
    g = rep.components["model"].graphs["forward"]
    x = inputs()
    with torch.no_grad():
        empty_registry.calls.clear()
        unet(**x)
        packed_gemms = linear_calls(empty_registry)
    g._baked = g._state()  # what a capture records
    unet.double().float()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert not attn.__dict__[qkv._ATTR].intact(attn)
    g._check_baked()
    assert attn.__dict__[qkv._ATTR].intact(attn)
    with torch.no_grad():
        empty_registry.calls.clear()
        torch.testing.assert_close(unet(**x).sample, eager(**x).sample, **TOL)
    assert linear_calls(empty_registry) == packed_gemms


def test_a_dropout_in_training_mode_runs_eagerly(empty_registry):
    """Defect (before: train / eval mode was no part of what a graph depends on): a graph captured in eval mode
    replayed after `.train()` (under no_grad) and skipped dropout's per-call draws. Now a tree with a dropout of
    p > 0 (or a batch norm) in training mode runs the patched eager path, counted `training` (on the CPU it
    counted `cpu` before: the check comes first); `.eval()` gives the graph path back. Modules whose training
    flag changes nothing do not count: PEFT leaves the LoRA layers it adds in training mode in an eval model,
    and those graphs must still capture."""
    pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from ._tiny_unet import inputs, pair

    _, unet = pair()
    unet.down_blocks[0].resnets[0].dropout.p = 0.1  # diffusers' default is 0: nothing would draw
    g = kernels.optimize(unet).components["model"].graphs["forward"]
    with torch.no_grad():
        unet(**inputs())
        unet.train()
        unet(**inputs())
        assert g.stats["training"] == 1 and g.stats["cpu"] == 1
        unet.up_blocks.eval()  # the dropout with p > 0 still trains
        unet(**inputs())
        unet.down_blocks[0].eval()
        unet(**inputs())
        assert g.stats["training"] == 2 and g.stats["cpu"] == 2
        unet.eval()
        unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k"]))
        assert any(m.training for m in unet.modules())  # PEFT's layers, left in training mode
        unet(**inputs())
    assert g.stats["training"] == 2 and g.stats["cpu"] == 3


def test_a_scaling_moved_by_an_ulp_keeps_its_graph_key():
    """diffusers' LoRA `scale` multiplies each PEFT scaling and divides it back inside the UNet's forward, which
    can move it by an ulp (0.75 * 0.7 / 0.7 != 0.75). Before, the key held the exact float: each call after
    such a forward missed its graph and captured another. A real change of scale still changes the key."""
    peft = pytest.importorskip("peft")
    from kernels.graphs import _peft_state

    m = nn.Sequential(nn.Linear(4, 4))
    m = peft.get_peft_model(m, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"])).base_model.model[0]
    m.scaling["default"] = 0.75
    key = _peft_state(m)
    m.scaling["default"] = 0.75 * 0.7 / 0.7
    assert m.scaling["default"] != 0.75 and _peft_state(m) == key
    m.scaling["default"] = 0.7
    assert _peft_state(m) != key


def test_a_cpu_tensor_scaling_is_keyed_by_its_value():
    """PEFT's compiled hotswap turns scalings into tensors on the weights' device; one left on the CPU (the model
    moved to the GPU afterwards) is read by the host at each kernel launch, so a graph keeps the captured value.
    Before, the key held the tensor object: a hotswap's in-place fill kept the key and the graph replayed the
    old scale. Now such a scaling is keyed by its value (a CUDA one stays keyed by the tensor: replays read it)."""
    peft = pytest.importorskip("peft")
    from kernels.graphs import _peft_state

    m = nn.Sequential(nn.Linear(4, 4))
    m = peft.get_peft_model(m, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"])).base_model.model[0]
    m.scaling["default"] = torch.tensor(0.75)
    key = _peft_state(m)
    m.scaling["default"].fill_(0.5)
    assert _peft_state(m) != key
