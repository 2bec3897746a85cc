"""kernels.patch on a real (tiny) diffusers UNet2DConditionModel, CPU: which modules route to the
shapetune ops, parity with eager, GroupNorm+SiLU fusion, fallbacks, LoRA-style weight updates, unpatch.

Tolerance: float32 on the CPU, 2e-4 absolute on the UNet output (O(1) values): every tuned op is
within 1e-4 of float64 (scheduler/verify.py), and a few of them compose through the network.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from kernels.patch import AttnProcessor, patch, unpatch
from scheduler.extract import extract_fused_workloads, extract_workloads, HANDLERS
from scheduler.tuner import TuneOptions, tune
from shapetune.target import detect

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)


def _unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**TINY).eval()
    with torch.no_grad():  # random weights big enough that every layer matters
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 7, 24, generator=g))


def _run(unet):
    with torch.no_grad():
        return unet(**_inputs()).sample


def _residual_convs():
    """The tiny UNet's conv2d+residual workloads tuned in tuned_db: a ResnetBlock2D conv2 (3x3) and a
    Transformer2DModel proj_out (1x1), as scheduler.extract lists them (shapetune/fusions.py's sites)."""
    ops = [o for o in extract_fused_workloads(_unet(), _inputs(), "float32", handlers=HANDLERS)
           if o.workload.op == "conv2d" and "residual" in o.workload.epilogue]
    resnet = next(o for o in ops if o.modules[0].endswith(".conv2"))
    proj = next(o for o in ops if o.modules[0].endswith(".proj_out"))
    return [resnet, proj]


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """A few of the tiny UNet's workloads tuned on llvm (1-2 trials each): attention (self and
    cross), GroupNorm with fused SiLU, a GEGLU, and RESIDUAL_CONVS (conv2d+residual; no plain conv);
    everything else stays untuned (torch fallback)."""
    from shapetune.ops.norm import eps_of, group_norm_workload

    ops = extract_workloads(_unet(), _inputs(), "float32", handlers=HANDLERS)
    ws = [o.workload for o in ops if o.workload.op in ("attention", "geglu")]
    gn = [o.workload for o in ops if o.workload.op == "group_norm"][:2]
    ws += [group_norm_workload(w.dim["n"], w.dim["hw"], w.dim["c"], w.dim["g"], "float32", eps_of(w), True)
           for w in gn]
    ws += [o.workload for o in _residual_convs()]
    path = tmp_path_factory.mktemp("patch") / "tuning.db"
    reps = tune(ws, detect("llvm"), path, TuneOptions(trials=2, batch=2,
                                                     templates=("attn_llvm", "geglu_llvm", "norm_llvm", "conv_llvm")))
    assert all(r.best is not None for r in reps), [(r.workload.name, r.by_status) for r in reps]
    return path


def test_patch_routes_every_family_and_is_idempotent():
    unet = _unet()
    rep = patch(unet)
    kinds = rep.patched
    assert kinds["linear"] > 0 and kinds["conv2d"] > 0 and kinds["group_norm"] > 0 and kinds["layer_norm"] > 0
    # 4 transformer blocks (down 1, mid 1, up 2), each with a GEGLU and attn1 + attn2;
    # 8 resnets (down 2, mid 2, up 4) x (norm1, norm2) + the UNet's conv_norm_out
    assert kinds["geglu"] == 4 and kinds["attention"] == 8
    assert kinds["group_norm+silu"] == 2 * 8 + 1
    assert all(isinstance(m.get_processor(), AttnProcessor) for m in unet.modules()
               if isinstance(m, diffusers.models.attention_processor.Attention))
    assert sum(patch(unet).patched.values()) == 0  # already patched: nothing more
    assert "linear" in str(rep)


def test_patched_unet_runs_tuned_kernels_and_matches_eager(registry):
    """Every family is called through its op; the tuned ones (attention, GEGLU, fused GroupNorm+SiLU)
    run their kernels inside the UNet, the rest fall back; the output is eager's."""
    unet = _unet()
    ref = _run(unet)
    patch(unet)
    registry.clear()
    out = _run(unet)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    s = kernels.fallback_summary()
    for op in ("linear", "conv2d", "group_norm", "layer_norm", "geglu", "attention"):
        assert sum(s[op].values()) > 0, op  # every family was called through its op
    assert s["attention"].get("tuned", 0) == 8 and s["geglu"].get("tuned", 0) == 4
    assert s["group_norm"].get("tuned", 0) >= 2  # the fused GroupNorm+SiLU workloads
    # only conv2d+residual workloads are tuned: every tuned conv call is a fused residual one
    assert s["conv2d"].get("tuned", 0) == sum(o.calls for o in _residual_convs()) > 0


def test_silu_passthrough_only_for_the_fused_norm_output():
    unet = _unet()
    patch(unet)
    blk = unet.down_blocks[0].resnets[0]
    x = torch.randn(2, 16, 8, 8)
    y = blk.norm1(x)  # SiLU already applied
    torch.testing.assert_close(y, nn.functional.silu(nn.functional.group_norm(x, 8, blk.norm1.weight,
                                                                                blk.norm1.bias, blk.norm1.eps)))
    assert blk.nonlinearity(y) is y  # passed through once ...
    torch.testing.assert_close(blk.nonlinearity(y), nn.functional.silu(y))  # ... then a plain SiLU again
    t = torch.randn(2, 64)  # the time embedding goes through the same SiLU module: applied
    torch.testing.assert_close(blk.nonlinearity(t), nn.functional.silu(t))


def test_weight_updates_apply_without_repatching(registry):
    """A LoRA fused into the weights (in place) or a module swapped for a wrapper: the patched
    model computes with the new weights, as eager does."""
    unet, eager = _unet(), _unet()
    patch(unet)
    with torch.no_grad():
        for m_p, m_e in zip(unet.modules(), eager.modules()):
            if isinstance(m_p, (nn.Linear, nn.Conv2d)):
                delta = 0.01 * torch.randn_like(m_p.weight)
                m_p.weight.add_(delta)
                m_e.weight.add_(delta)
    torch.testing.assert_close(_run(unet), _run(eager), atol=2e-4, rtol=1e-4)


def test_unpatch_restores_torch_forwards():
    unet = _unet()
    ref = _run(unet)
    n = sum(patch(unet).patched.values())
    assert unpatch(unet) > 0 and n > 0
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not any(isinstance(m.get_processor(), AttnProcessor) for m in unet.modules()
                   if isinstance(m, diffusers.models.attention_processor.Attention))
    torch.testing.assert_close(_run(unet), ref)


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        patch(object())


def test_bench_e2e_smoke(tmp_path, monkeypatch):
    """scripts/bench_e2e.py end to end on the tiny UNet (CPU): every mode runs and matches eager."""
    import json
    import runpy

    from tests._scripts import run_main

    out = tmp_path / "e2e.json"
    run_main(monkeypatch, lambda: runpy.run_path("scripts/bench_e2e.py", run_name="__main__"),
             ["bench_e2e.py", "--tiny", "--device", "cpu", "--modes", "eager,eager_cl,shapetune",
              "--iters", "2", "--warmup", "1", "--json", str(out)])
    d = json.loads(out.read_text())
    rows = d["rows"]
    assert set(rows) == {"eager", "eager_cl", "shapetune"}
    assert all(set(per) == {"2x512", "1x512"} for per in rows.values())  # the default shape matrix
    assert all(r["rel_l2_vs_eager"] < 1e-5 and r["us"] > 0 for per in rows.values() for r in per.values())
    assert all(per["2x512"]["first_call_s"] > 0 and per["1x512"]["shape_change_s"] > 0 for per in rows.values())
    # per shape, 8 attentions x (first call + 1 warm-up + 2 timed + parity)
    assert all(sum(r["calls"]["attention"].values()) == 8 * 5 for r in rows["shapetune"].values())
    assert d["graphs"]["shapetune"]["model"]["cpu"] == 10


def test_registry_prebuild_fills_the_kernel_cache(tuned_db, tmp_path, monkeypatch):
    """Registry.prebuild builds every dispatched kernel in parallel; the next call loads, never builds."""
    from kernels.registry import Registry

    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(tmp_path / "cache"))
    reg = Registry(db_path=tuned_db, target=detect("llvm"), require_faster=False)
    first = reg.prebuild(jobs=2)
    assert first["built"] >= 4 and first["failed"] == 0
    assert reg.prebuild(jobs=2) == {"reverified": 0, "reverify_failed": 0, "cached": first["built"], "built": 0,
                                    "failed": 0}  # measured here: nothing to re-verify


def test_torch_compile_of_a_patched_unet(registry):
    """torch.compile over a patched UNet: no graph breaks (the ops are custom ops with fake kernels,
    the SiLU pass-through traces as a constant decision), tuned kernels called from the compiled
    graph, output as eager's."""
    import torch._dynamo

    unet = _unet()
    ref = _run(unet)
    patch(unet)
    registry.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = _run(torch.compile(unet))
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert kernels.fallback_summary()["attention"].get("tuned", 0) >= 8


# -- extraction and patching agree (shapetune/fusions.py is the one table both read) ------------------
def _dispatched(model, inputs, tmp_path):
    """The workloads a patched `model` dispatches in one forward (registry lookups, nothing tuned)."""
    from kernels.registry import Registry

    reg = Registry(db_path=tmp_path / "empty.db", target=detect("llvm"))
    seen, lookup = [], reg.lookup

    def record(sig, make_workload):
        seen.append(make_workload())
        return lookup(sig, make_workload)

    reg.lookup = record
    prev = kernels.set_registry(reg)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        kernels.set_registry(prev)
    return set(seen)


def _by_op(ws):
    out = {}
    for w in ws:
        out.setdefault(w.op, set()).add(w)
    return out


def test_extraction_and_patching_agree_on_the_tiny_unet(tmp_path):
    """Every workload the patched UNet dispatches is extracted (the fused ops', and the elementwise
    passes around the convs and GEGLUs that nothing tuned serves), and for every op but linear the sets
    are equal (extraction also lists the linear inside each GEGLU, whose patched forward skips it)."""
    from scheduler.extract import elementwise_workloads, extract_workloads
    from shapetune.fusions import fusion_sites

    unet = _unet()
    passes = elementwise_workloads(extract_workloads(unet, _inputs(), "float32", HANDLERS), fusion_sites(unet))
    extracted = _by_op([o.workload for o in extract_fused_workloads(unet, _inputs(), "float32", handlers=HANDLERS)]
                       + [o.workload for o in passes])
    patch(unet)
    dispatched = _by_op(_dispatched(unet, _inputs(), tmp_path))
    assert set(dispatched) == set(extracted)
    for op in extracted:
        if op == "linear":
            assert dispatched[op] <= extracted[op]
        else:
            assert dispatched[op] == extracted[op], op
    residual = {w for w in dispatched["conv2d"] if "residual" in w.epilogue}
    assert len(residual) >= 2  # ResnetBlock2D conv2 and Transformer2DModel proj_out
    assert {w for w in dispatched["group_norm"] if "silu" in w.epilogue}
    assert {w.epilogue for w in dispatched["bias_add"]} == {(), ("residual",), ("shift",)}  # conv1 + temb too


class _Block(nn.Module):
    """diffusers' GELU feed-forward and a residual_connection Attention: linear+gelu and linear+residual."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention import FeedForward
        from diffusers.models.attention_processor import Attention

        self.ff = FeedForward(12, mult=2, activation_fn="gelu")
        self.attn = Attention(12, heads=3, dim_head=4, residual_connection=True, rescale_output_factor=2.0)

    def forward(self, x):
        return self.attn(self.ff(x))


def test_gelu_and_attention_residual_reach_the_fused_linears(tmp_path):
    torch.manual_seed(0)
    blk = _Block().eval()
    x = torch.randn(2, 5, 12)
    ref = blk(x)
    extracted = {o.workload for o in extract_fused_workloads(blk, {"x": x}, "float32", handlers=HANDLERS)}
    rep = patch(blk)
    assert rep.patched["linear+gelu"] == 1 and rep.patched["linear+residual"] == 1
    prev = kernels.set_registry(kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    try:
        with torch.no_grad():
            out = blk(x)
        s = kernels.fallback_summary()
    finally:
        kernels.set_registry(prev)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sum(s["linear_gelu"].values()) == 1 and sum(s["linear_residual"].values()) == 1
    dispatched = _dispatched(blk, {"x": x}, tmp_path)
    assert dispatched <= extracted
    assert {w.epilogue for w in dispatched if w.op == "linear"} >= {("bias", "gelu"), ("bias", "residual")}
    unpatch(blk)
    torch.testing.assert_close(blk(x), ref)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_resnet_block_fuses_its_residual_at_any_output_scale(scale, tmp_path):
    """ResnetBlock2D with a conv_shortcut (16 -> 32 channels): conv2 gets the shortcut as residual,
    the sum divided by output_scale_factor; the output is eager's."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    blk = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=20, groups=8,
                        output_scale_factor=scale).eval()
    x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 20)
    with torch.no_grad():
        ref = blk(x, temb)
    assert patch(blk).patched["conv2d+residual"] == 1
    ws = _dispatched(blk, {"input_tensor": x, "temb": temb}, tmp_path)
    assert [w.epilogue for w in ws if w.op == "conv2d" and "residual" in w.epilogue] == [("bias", "residual")]
    with torch.no_grad():
        torch.testing.assert_close(blk(x, temb), ref, atol=1e-5, rtol=1e-5)
