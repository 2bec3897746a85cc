"""Workload extraction from the SD 1.5 UNet (meta device: seconds, no memory)."""

import json

import pytest
import torch
from torch import nn

from scheduler.extract import (
    ExtractedOp,
    extract_workloads,
    load_workload_file,
    save_workload_file,
    sd15_linear_workloads,
    sd15_unet_inputs,
)
from scheduler.sd_configs import build_sd15_unet
from shapetune.ops.linear import linear_workload


@pytest.fixture(scope="module")
def unet():
    return build_sd15_unet(device="meta")


@pytest.fixture(scope="module")
def ops():
    return sd15_linear_workloads(batch=2, height=512, width=512)


def _by_module(ops):
    return {name: op for op in ops for name in op.modules}


def _find(ops, m, n, k, bias):
    w = linear_workload(m, n, k, "float16", bias)
    hits = [op for op in ops if op.workload == w]
    assert len(hits) == 1, f"{w.name} not extracted"
    return hits[0]


def test_sd15_config_builds_expected_unet(unet):
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.cross_attention_dim == 768
    assert next(unet.parameters()).is_meta
    n_params = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n_params < 865e6  # SD 1.5 UNet: 859.5M


def test_known_sd15_gemms(ops):
    mods = _by_module(ops)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0"
    # self-attention's q/k/v and cross-attention's k/v run as one GEMM each (kernels/qkv.py), recorded
    # under the first projection's name
    assert mods[f"{attn}.attn1.to_q"].workload == linear_workload(8192, 3 * 320, 320, "float16", bias=False)
    assert f"{attn}.attn1.to_k" not in mods and f"{attn}.attn2.to_v" not in mods
    assert mods[f"{attn}.attn2.to_q"].workload == linear_workload(8192, 320, 320, "float16", bias=False)
    # the transformer block adds its input to to_out.0's and ff.net.2's outputs: fused (shapetune.fusions)
    assert mods[f"{attn}.attn1.to_out.0"].workload == linear_workload(8192, 320, 320, "float16",
                                                                      epilogue=("bias", "residual"))
    # the 16 cross-attentions' k/v read the same context: one GEMM per forward (kernels/ctxkv.py),
    # 2 x (2x320 + 2x640 + 2x1280 down, 1280 mid, 3x1280 + 3x640 + 3x320 up) = 24960 columns, under the first
    kv = mods[f"{attn}.attn2.to_k"]
    assert kv.workload == linear_workload(154, 24960, 768, "float16", bias=False) and kv.calls == 1
    assert "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k" not in mods
    assert mods[f"{attn}.ff.net.0.proj"].workload == linear_workload(8192, 2560, 320, "float16", bias=True)
    assert mods[f"{attn}.ff.net.2"].workload == linear_workload(8192, 320, 1280, "float16",
                                                                epilogue=("bias", "residual"))
    assert mods["time_embedding.linear_1"].workload == linear_workload(2, 1280, 320, "float16", bias=True)
    assert mods["time_embedding.linear_2"].workload == linear_workload(2, 1280, 1280, "float16", bias=True)
    # the 22 resnets' time_emb_proj run as one GEMM per forward (kernels/temb.py): 2x(320+640+1280+1280)
    # down, 2x1280 mid, 3x(1280+1280+640+320) up = 20160 columns, under the first resnet's name
    temb = mods["down_blocks.0.resnets.0.time_emb_proj"]
    assert temb.workload == linear_workload(2, 20160, 1280, "float16", bias=True) and temb.calls == 1
    assert "down_blocks.2.resnets.0.time_emb_proj" not in mods


def test_counts_and_dedup(ops, unet):
    n_linear_calls = 0

    def count(*_):
        nonlocal n_linear_calls
        n_linear_calls += 1

    hooks = [m.register_forward_hook(count) for m in unet.modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        unet(**sd15_unet_inputs(2, 512, 512))
    for h in hooks:
        h.remove()

    assert n_linear_calls == 184
    # 16 self-attentions run q/k/v as one GEMM (2 calls fewer each), 16 cross-attentions k/v (1 fewer),
    # all of those k/v one GEMM (15 fewer), the 22 resnets' time-embedding projections one GEMM (21 fewer)
    assert sum(op.calls for op in ops) == n_linear_calls - 16 * 2 - 16 - 15 - 21 == 100
    assert len({op.workload for op in ops}) == len(ops)
    # at 64x64: 5 blocks' self-attention q/k/v as one GEMM, and their cross-attention queries
    assert _find(ops, 8192, 3 * 320, 320, bias=False).calls == 5
    assert _find(ops, 8192, 320, 320, bias=False).calls == 5
    # every cross-attention's K/V: one GEMM per forward
    assert _find(ops, 154, 24960, 768, bias=False).calls == 1
    assert all(op.workload.dtype == "float16" for op in ops)


def test_batch_and_resolution_scale_m():
    ops = sd15_linear_workloads(batch=1, height=256, width=384, dtype="float32")
    assert {op.workload.dtype for op in ops} == {"float32"}
    mods = _by_module(ops)
    q = mods["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].workload
    assert q == linear_workload(32 * 48, 3 * 320, 320, "float32", bias=False)  # q/k/v as one GEMM
    assert mods["time_embedding.linear_1"].workload.dim["m"] == 1


def test_handler_table_on_cpu_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16, bias=False), nn.Linear(16, 32))
    ops = extract_workloads(model, {"input": torch.zeros(3, 5, 16)}, dtype="float32")
    assert ops == [
        ExtractedOp(linear_workload(15, 32, 16, "float32", True), ("0", "3"), 2),
        ExtractedOp(linear_workload(15, 16, 32, "float32", False), ("2",), 1),
    ]


def test_workload_file_round_trip(ops, tmp_path):
    path = tmp_path / "sd15.json"
    save_workload_file(path, ops, meta={"batch": 2})
    doc = json.loads(path.read_text())
    assert len(doc["workloads"]) == len(ops)
    loaded = load_workload_file(path)
    assert loaded == [op.workload for op in ops]
    assert [w.key for w in loaded] == [op.workload.key for op in ops]


def test_load_rejects_bad_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError):
        load_workload_file(path)


class _NeedsData(nn.Module):
    """Reads a tensor value, which the meta device cannot do."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        reps = int(x.sum().item() >= 0) + 1
        return self.proj(x.repeat(reps, 1))


def test_meta_failure_falls_back_to_cpu():
    with torch.device("meta"):
        model = _NeedsData()
    with pytest.warns(UserWarning, match="retrying on CPU"):
        ops = extract_workloads(model, {"x": torch.zeros(3, 8, device="meta")})
    assert [op.workload for op in ops] == [linear_workload(6, 4, 8, "float16", True)]
    assert next(model.parameters()).is_meta  # the caller's model is untouched


def test_sd15_attention_workloads():
    """Self-attention at 4096/1024/256/64 latent tokens and cross-attention to 77 text tokens, 8 heads,
    head dim 40/80/160/160, diffusers' scale (dim_head ** -0.5) naming the same kernel as 1/sqrt(d)."""
    from shapetune.ops.attention import attention_workload
    from scheduler.extract import sd15_attention_workloads

    ops = {op.workload: op.calls for op in sd15_attention_workloads()}
    want = {(s, kv, d) for s, d in ((4096, 40), (1024, 80), (256, 160), (64, 160)) for kv in (s, 77)}
    assert {(w.dim["sq"], w.dim["skv"], w.dim["d"]) for w in ops} == want
    assert all(w.dim["b"] == 2 and w.dim["h"] == 8 for w in ops)
    assert ops[attention_workload(2, 4096, 77, 8, 40)] == 5 and ops[attention_workload(2, 64, 64, 8, 160)] == 1
    assert sum(ops.values()) == 32  # 16 transformer blocks x (attn1 + attn2)


def test_sd15_fusion_sites_are_the_resnet_and_transformer_outputs(unet):
    """shapetune/fusions.py on SD 1.5: SiLU follows every resnet's norm1/norm2 and conv_norm_out; a
    residual is added to every resnet's conv2, every Transformer2DModel's 1x1 proj_out and, in each of
    the 16 BasicTransformerBlocks, to attn1's and attn2's to_out.0 and the FeedForward's ff.net.2 (no
    GELU: SD 1.5's FeedForwards are GEGLU), whose norm2 and norm3 read attn1's and attn2's sums; the time
    embedding to every resnet's conv1."""
    from shapetune.fusions import fusion_sites

    sites = fusion_sites(unet)
    names = [n for n, _ in unet.named_modules()]
    silu = {n for n in names if ".resnets." in n and n.rsplit(".", 1)[-1] in ("norm1", "norm2")} | {"conv_norm_out"}
    residual = {n for n in names if ".resnets." in n and n.endswith(".conv2")
                or ".attentions." in n and n.endswith(".proj_out")
                or ".transformer_blocks." in n and n.endswith((".attn1.to_out.0", ".attn2.to_out.0", ".ff.net.2"))}
    assert {n for n, s in sites.items() if s.kind == "silu"} == silu
    assert {n for n, s in sites.items() if s.kind == "residual"} == residual
    shift = {n for n in names if ".resnets." in n and n.endswith(".conv1")}  # + the time embedding
    assert {n for n, s in sites.items() if s.kind == "shift"} == shift and len(shift) == 22
    # norm2 reads conv1's output + the time embedding: group_norm's shift step (every conv1 has a bias)
    assert {n for n, s in sites.items() if s.shift} == {n[: -len("conv1")] + "norm2" for n in shift}
    # the LayerNorms that read attn1's and attn2's residual sums: add_layer_norm where one is tuned
    add = {n for n in names if ".transformer_blocks." in n and n.endswith((".norm2", ".norm3"))}
    assert {n for n, s in sites.items() if s.kind == "add_before"} == add and len(add) == 2 * 16
    assert len(residual) == 22 + 16 + 3 * 16 and set(sites) == silu | residual | shift | add


def test_fused_workload_folds_the_site_into_the_epilogue():
    from shapetune.ops.conv import conv2d_workload
    from shapetune.fusions import GELU_EPILOGUE, RESIDUAL, Site
    from shapetune.ops.norm import group_norm_workload
    from scheduler.extract import fused_workload

    lin = linear_workload(10, 24, 12, "float32", bias=True)
    assert fused_workload(lin, GELU_EPILOGUE) == linear_workload(10, 24, 12, "float32", epilogue=("bias", "gelu"))
    assert fused_workload(linear_workload(10, 24, 12, bias=False), RESIDUAL).epilogue == ("residual",)
    assert fused_workload(lin, Site("silu", "act")) is None and fused_workload(lin, None) is None
    conv = conv2d_workload(2, 8, 8, 16, 16, 3, 3, 1, 1, "float32", True)
    assert fused_workload(conv, RESIDUAL) == conv2d_workload(2, 8, 8, 16, 16, 3, 3, 1, 1, "float32", True, True)
    assert fused_workload(conv, GELU_EPILOGUE) is None
    gn = group_norm_workload(2, 64, 32, 8, "float32")
    assert fused_workload(gn, Site("silu", "act")) == group_norm_workload(2, 64, 32, 8, "float32", silu=True)
    assert fused_workload(gn, Site("silu", "act", shift=True)) == group_norm_workload(2, 64, 32, 8, "float32",
                                                                                      silu=True, shift=True)


# -- every family in one pass; the VAE decoder -------------------------------------------------------
def test_one_pass_equals_one_extraction_per_family():
    """sd15_workloads runs one forward with every family's handlers (scheduler.extract.family_workloads);
    it must list what the per-family extractions list, in their order (fused and elementwise included)."""
    from scheduler.extract import SD15_FAMILIES, sd15_workloads

    kw = dict(batch=3, height=320, width=448, dtype="float16")
    per_family = [op for f in SD15_FAMILIES for op in SD15_FAMILIES[f](**kw)]
    assert sd15_workloads(**kw) == per_family and len(per_family) > 100
    assert sd15_workloads(("attention", "norms"), **kw) == (SD15_FAMILIES["attention"](**kw)
                                                             + SD15_FAMILIES["norms"](**kw))


def test_tiny_vae_decode_workloads_are_what_the_patched_decoder_calls(tmp_path):
    """The VAE decoder's workloads (decode: post_quant_conv, then the decoder; never the encoder) on the
    tiny config, latents 2 x 4 x 16 x 24: their calls per op equal the op calls a kernels.patch-ed VAE
    makes in one decode on the CPU (every one counted by the registry, no DB: all fall back), so
    extraction sees what patching serves; the convs run at the latent size, then 2x it (one upsampler)."""
    import kernels
    from kernels.registry import Registry, set_registry
    from scheduler.extract import family_workloads, sd15_vae_inputs, sd15_vae_workloads
    from scheduler.sd_configs import build_sd15_vae
    from shapetune.target import detect

    torch.manual_seed(0)
    vae = build_sd15_vae(tiny=True)
    ops = family_workloads(vae, sd15_vae_inputs(2, 128, 192, device="cpu"), dtype="float32", method="decode")
    modules = {m for op in ops for m in op.modules}
    assert "post_quant_conv" in modules and not any(m.startswith("encoder.") for m in modules)
    convs = [op.workload for op in ops if op.workload.op == "conv2d"]
    assert {(w.dim["h"], w.dim["w"]) for w in convs} == {(16, 24), (32, 48)} and {w.dim["n"] for w in convs} == {2}
    assert any("silu" in op.workload.epilogue for op in ops if op.workload.op == "group_norm")
    extracted: dict[str, int] = {}
    for op in ops:
        extracted[op.workload.op] = extracted.get(op.workload.op, 0) + op.calls
    assert {"conv2d", "group_norm", "linear", "bias_add"} <= set(extracted)

    prev = set_registry(Registry(db_path=tmp_path / "none.db", target=detect("llvm")))
    try:
        kernels.patch(vae)
        with torch.no_grad():
            vae.decode(torch.randn(2, 4, 16, 24))
        served = {op: sum(d.values()) for op, d in kernels.fallback_summary().items()}
    finally:
        kernels.unpatch(vae)
        set_registry(prev)
    assert served == extracted
    # the SD 1.5 VAE on the meta device: its decoder's 4 levels at 64 x 96 latents, 512 channels at the top
    big = {op.workload for op in sd15_vae_workloads(batch=1, height=512, width=768)}
    assert {(w.dim["h"], w.dim["w"]) for w in big if w.op == "conv2d"} == {(64, 96), (128, 192), (256, 384), (512, 768)}
    assert max(w.dim["hw"] for w in big if w.op == "group_norm") == 512 * 768


# -- SDXL's UNet -------------------------------------------------------------------------------------
def _randomized(inputs: dict, g: torch.Generator) -> dict:
    """`inputs` with every floating tensor but the time ids drawn from N(0, 1) (nested dicts too)."""
    def r(k, v):
        if isinstance(v, dict):
            return {kk: r(kk, vv) for kk, vv in v.items()}
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "time_ids":
            return torch.randn(v.shape, generator=g)
        return v
    return {k: r(k, v) for k, v in inputs.items()}


@pytest.mark.parametrize("model", ["unet", "sdxl_unet"])
def test_tiny_unet_workloads_are_what_the_patched_unet_calls(model, tmp_path):
    """The grid's UNet workloads (model_workloads: SD 1.5's and SDXL's, whose text_time added conditions
    and 2-layer transformer blocks the tiny TINY_SDXL_UNET keeps) on the tiny configs, batch 2 at
    64 x 128 px, extracted on the meta device: their calls per op equal the op calls a kernels.patch-ed copy
    with random weights makes in one forward on the CPU with random inputs (every one counted by the
    registry, no DB: all fall back). A served GEGLU runs its proj GEMM inside its op: the grid's weights
    leave that Linear out (it had 8 calls too many: 100 extracted, 92 dispatched on SDXL's)."""
    import diffusers

    import kernels
    from kernels.registry import Registry, set_registry
    from scheduler.extract import model_inputs, model_workloads
    from scheduler.pipelines import TINY_UNET
    from scheduler.sd_configs import build_sdxl_unet
    from shapetune.target import detect

    def per_op(ops) -> dict[str, int]:  # per custom op: a linear's residual / gelu epilogue is its own op
        out: dict[str, int] = {}
        for op in ops:
            w = op.workload
            name = w.op + next((f"_{e}" for e in ("residual", "gelu") if w.op == "linear" and e in w.epilogue), "")
            out[name] = out.get(name, 0) + op.calls
        return out

    ops = model_workloads(model, batch=2, height=64, width=128, dtype="float32", tiny=True)
    extracted = per_op(ops)
    every_linear = per_op(model_workloads(model, batch=2, height=64, width=128, dtype="float32", tiny=True,
                                          dispatched=False))
    assert every_linear == {**extracted, "linear": extracted["linear"] + extracted["geglu"]}
    assert {"conv2d", "group_norm", "layer_norm", "add_layer_norm", "linear", "linear_residual", "geglu", "attention",
            "bias_add", "gelu_gate"} == set(extracted)
    if model == "sdxl_unet":
        assert _by_module(ops)["add_embedding.linear_1"].workload == linear_workload(2, 128, 80, "float32", bias=True)

    torch.manual_seed(0)
    unet = build_sdxl_unet(tiny=True) if model == "sdxl_unet" else diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    x = _randomized(model_inputs(model, 2, 64, 128, tiny=True, device="cpu"), torch.Generator().manual_seed(1))
    if model == "sdxl_unet":
        assert x["added_cond_kwargs"]["time_ids"][0].tolist() == [64, 128, 0, 0, 64, 128]
    prev = set_registry(Registry(db_path=tmp_path / "none.db", target=detect("llvm")))
    try:
        kernels.patch(unet)
        with torch.no_grad():
            out = unet(**x).sample
        served = {op: sum(d.values()) for op, d in kernels.fallback_summary().items()}
    finally:
        kernels.unpatch(unet)
        set_registry(prev)
    assert out.shape == (2, 4, 8, 16) and out.abs().sum() > 0
    # with no add_layer_norm kernel a block's norm2 / norm3 run the layer_norm op after torch's add (the
    # add_layer_norm call counted as its fallback): the grid weighs the fused op, which is what a tuned
    # model runs; likewise a resnet's norm2 without a kernel for its shift runs the plain group_norm op
    # (the group_norm+shift ask counted as its fallback), extracted as the group_norm with the shift
    shifted = sum(op.calls for op in ops if op.workload.op == "group_norm" and "shift" in op.workload.epilogue)
    assert shifted > 0
    assert served == {**extracted, "layer_norm": extracted["layer_norm"] + extracted["add_layer_norm"],
                      "group_norm+shift": shifted}


def test_sdxl_unet_workloads_at_1024():
    """SDXL base's UNet on the meta device at batch 2, 1024²: the added conditions' GEMM reads 1280 pooled
    text channels + 6 x 256 time-id channels; cross-attention's k / v GEMMs read the 2048-wide context
    (m = 2 x 77); the 10-layer level runs self-attention over 32 x 32 latent tokens, 20 heads of 64."""
    from scheduler.extract import model_workloads
    from shapetune.ops.attention import attention_workload

    from scheduler.sd_configs import build_sdxl_unet

    assert 2.56e9 < sum(p.numel() for p in build_sdxl_unet(device="meta").parameters()) < 2.57e9  # SDXL base: 2.567B
    ops = model_workloads("sdxl_unet", batch=2, height=1024, width=1024)
    mods = _by_module(ops)
    assert mods["add_embedding.linear_1"].workload == linear_workload(2, 1280, 2816, "float16", bias=True)
    blk = "down_blocks.2.attentions.0.transformer_blocks.9"
    # all 70 cross-attentions' k/v as one GEMM per forward, under the first's name: 2 x (4 x 640 + 20 x 1280
    # down, 10 x 1280 mid, 30 x 1280 + 6 x 640 up) = 166400 columns
    kv = mods["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert kv.workload == linear_workload(154, 166400, 2048, "float16", bias=False) and kv.calls == 1
    assert f"{blk}.attn2.to_k" not in mods
    assert mods[f"{blk}.attn1.to_q"].workload == linear_workload(2048, 3 * 1280, 1280, "float16", bias=False)
    att = {op.workload: op.calls for op in ops if op.workload.op == "attention"}
    assert att[attention_workload(2, 1024, 1024, 20, 64)] == 10 * (2 + 3 + 1)  # down 2, up 3, mid 1 blocks
    assert sum(att.values()) == 2 * 70  # 70 transformer blocks x (attn1 + attn2)


def test_workload_keys_are_the_dispatched_workloads_and_their_buckets_in_the_dtype():
    """What `shapetune prebuild --models --shapes` keeps: each workload a patched call dispatches at
    each shape, in the target's dtype, and the bucket that would serve it."""
    from scheduler.extract import model_workloads, workload_keys
    from shapetune.buckets import DEFAULT

    keys = workload_keys(["unet"], [(1, 64, 64), (2, 64, 128)], "float32", tiny=True)
    for b, h, w in ((1, 64, 64), (2, 64, 128)):
        for op in model_workloads("unet", batch=b, height=h, width=w, dtype="float32", tiny=True):
            assert op.workload.key in keys
            bucket = DEFAULT.bucket_of(op.workload)
            assert bucket is None or bucket.key in keys
    assert not keys & workload_keys(["unet"], [(1, 64, 64)], "float16", tiny=True)
    assert keys > workload_keys(["unet"], [(1, 64, 64)], "float32", tiny=True)
