"""Acceleration options: batched CFG, TeaCache, torch.compile, the attention kernel and CPU offload.

Each option is checked for what it does on the tiny model and for being wired from the storyboard to the sampler
(or the worker).  On a CPU-only machine the GPU-only parts (flash attention, offload's device moves) can only be
checked for raising clearly and for the moves being made; the ``gpu`` tests do the rest where CUDA exists.
"""

from __future__ import annotations

import pytest
import torch

from skyray.engine import forward as Fw
from skyray.engine import sampler as S
from skyray.engine import teacache as TC
from skyray.engine.schedule import shot_windows
from skyray.engine.text import PromptCache

HW = (4, 4)  # 32x32 pixels
PROMPT, NEG = "a red fox runs through snow", "blurry, low quality"


def render(tiny, windows=None, family="tiny", **kw):
    """Latents of a 3-window shot (9 latents, windows of 5 with 2 handed over) and its predictor."""
    cfg = S.SamplerConfig(**{"steps": 6, **kw})
    text = PromptCache(tiny.tokenizer, tiny.text_encoder).embeds(PROMPT, NEG, cfg.guidance)
    predict = S.NoisePredictor(tiny.transformer, cfg, family=family)
    windows = windows if windows is not None else shot_windows(9, 5, 2)
    gen = torch.Generator("cpu").manual_seed(5)
    return S.sample_shot(predict, tiny.scheduler_for(8.0), [text], windows, HW, gen), predict


# ------------------------------------------------------------------------------------------------ batched CFG


def test_batched_cfg_equals_sequential(tiny):
    batched, pb = render(tiny, batched_cfg=True)
    sequential, ps = render(tiny, batched_cfg=False)
    assert (batched - sequential).abs().max().item() <= 1e-5
    assert pb.forwards == ps.forwards  # same work, counted per batch item


def test_batched_cfg_equals_sequential_async_causal(tiny):
    kw = dict(ar_step=1, causal_block_size=2, causal_attention=True)
    w = shot_windows(8, 6, 2)
    a, _ = render(tiny, w, batched_cfg=True, **kw)
    b, _ = render(tiny, w, batched_cfg=False, **kw)
    assert (a - b).abs().max().item() <= 1e-5


def test_window_state_is_transparent(tiny):
    # Rope, mask and text keys/values are computed once per window; a bare df_forward computes them itself.
    x = torch.randn(2, 16, 5, *HW, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[999, 800, 600, 400, 0]] * 2)
    text = torch.randn(2, 512, 32, generator=torch.Generator().manual_seed(2))
    ids = Fw.causal_block_ids(0, 5, 0, 2)
    bare = Fw.df_forward(tiny.transformer, x, t, text, 24, ids)
    geo = Fw.window_geometry(tiny.transformer, tuple(x.shape), x.device, ids)
    ctx = Fw.text_context(tiny.transformer, text)
    assert torch.equal(bare, Fw.df_forward(tiny.transformer, x, t, ctx, 24, ids, geometry=geo))


# --------------------------------------------------------------------------------------------------- TeaCache


def test_teacache_threshold_zero_is_identical_to_no_cache(tiny):
    plain, p0 = render(tiny)
    zero, pz = render(tiny, teacache=0.0)
    assert torch.equal(plain, zero) and pz.skipped == 0


def test_teacache_that_never_skips_is_identical(tiny):
    # The hook itself (cache the residual, run the blocks) changes nothing while nothing is skipped.
    plain, _ = render(tiny)
    hooked, p = render(tiny, teacache=1e-9)
    assert p.skipped == 0
    assert torch.equal(plain, hooked)


def test_teacache_skips_forwards(tiny):
    plain, p0 = render(tiny)
    cached, p = render(tiny, teacache=1.0)
    assert p.forwards == p0.forwards == 3 * 6 * 2  # 3 windows x 6 rows x (cond + uncond)
    # First and last rows of each window always compute: at most 4 of 6 rows per window are skipped.
    assert 0 < p.skipped <= 3 * 4 * 2
    assert torch.isfinite(cached).all()
    assert (cached - plain).abs().max().item() < 0.25 * plain.abs().max().item()


def test_teacache_sequential_cfg_skips_the_same_rows(tiny):
    # The time embedding does not depend on the text: both branches decide alike, batched or not.
    _, batched = render(tiny, teacache=1.0, batched_cfg=True)
    _, sequential = render(tiny, teacache=1.0, batched_cfg=False)
    assert batched.skipped == sequential.skipped > 0


def test_teacache_state_restarts_every_window():
    cache = TC.WindowTeaCache(threshold=10.0, family="tiny", rows=4)
    x = torch.zeros(1, 3, 2)

    def run(v):
        return v + 1.0

    outs = []
    for row in range(4):
        cache.at_row(row)
        outs.append(cache.branch("both")(x, torch.full((1, 2, 2), 1.0 + row), run))
    state = cache.branch("both")
    assert (state.computed, state.skipped) == (2, 2)  # rows 0 and 3 forced, 1 and 2 reuse the residual
    assert all(torch.equal(o, x + 1.0) for o in outs)
    fresh = TC.WindowTeaCache(threshold=10.0, family="tiny", rows=4)
    fresh.at_row(1)
    assert fresh.branch("both").residual is None  # a new window has nothing to reuse: it computes
    with pytest.raises(ValueError):
        TC.TeaCache(0.0, TC.IDENTITY)


def test_teacache_coefficients_follow_the_family_name():
    assert TC.coefficients_for("1.3B") == TC.COEFFICIENTS["1.3B"]
    assert TC.coefficients_for("14B") == TC.COEFFICIENTS["14B"] != TC.COEFFICIENTS["1.3B"]
    for name in ("tiny", "custom", "Skywork/SkyReels-V2-DF-14B-540P-Diffusers"):
        assert TC.coefficients_for(name) == TC.IDENTITY  # a path is not a family


# ------------------------------------------------------------------------------------- compile and attention


def test_compile_option_compiles_the_blocks(tiny, monkeypatch):
    import torch._dynamo

    # Inductor takes ~30 s on this CPU; the eager backend runs the same Dynamo capture in about a second.
    monkeypatch.setattr(S, "compiled_block", lambda: Fw.compiled_block("eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    w = shot_windows(5, 5, 0)
    plain, _ = render(tiny, w, steps=2)
    compiled, p = render(tiny, w, steps=2, compile=True)
    assert p._block_fn is Fw.compiled_block("eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert (compiled - plain).abs().max().item() <= 1e-5


def test_compile_defaults_to_inductor(tiny):
    p = S.NoisePredictor(tiny.transformer, S.SamplerConfig(compile=True))
    assert p._block_fn is Fw.compiled_block("inductor")
    assert S.NoisePredictor(tiny.transformer, S.SamplerConfig())._block_fn is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_flash_attention_needs_cuda(tiny):
    with pytest.raises(ValueError, match="flash.*CUDA"):
        S.NoisePredictor(tiny.transformer, S.SamplerConfig(attention="flash"))


def test_xfuser_attention_is_refused_without_its_group(tiny):
    with pytest.raises(ValueError, match="xfuser"):
        S.NoisePredictor(tiny.transformer, S.SamplerConfig(attention="xfuser"))
    with pytest.raises(ValueError, match="sdpa"):
        S.NoisePredictor(tiny.transformer, S.SamplerConfig(attention="fast"))  # type: ignore[arg-type]


@pytest.mark.gpu
def test_flash_attention_matches_sdpa_on_gpu():
    from skyray import models

    comps = models.load("tiny", "cuda")
    out = {}
    for kernel in ("sdpa", "flash"):
        out[kernel], _ = render(comps, shot_windows(5, 5, 0), steps=2, attention=kernel)
    assert (out["flash"] - out["sdpa"]).abs().max().item() < 5e-2  # bf16 kernels


# ------------------------------------------------------------------------------------------- storyboard wiring


def test_storyboard_options_reach_the_sampler_config(tmp_path):
    from skyray.plan import compile_plan
    from skyray.render import sampler_config
    from skyray.storyboard import parse_storyboard

    sb = parse_storyboard(
        """
title: options
model: tiny
resolution: 32x32
defaults: {cfg_batch: false, teacache: {threshold: 0.2}, compile: true, attention: flash, offload: true}
shots:
  - {id: a, prompt: a fox, frames: 17}
  - {id: b, prompt: a hare, frames: 17, cfg_batch: true, teacache: {threshold: 0}, compile: false,
     attention: sdpa, offload: false}
  - {id: c, prompt: an owl, frames: 17, teacache: {threshold: 0.3}}
""",
        tmp_path,
    )
    plan = compile_plan(sb)
    a, b, c = (sampler_config(plan.shot(i)) for i in "abc")
    assert (a.batched_cfg, a.teacache, a.compile, a.attention, a.offload) == (False, 0.2, True, "flash", True)
    assert (b.batched_cfg, b.teacache, b.compile, b.attention, b.offload) == (True, 0.0, False, "sdpa", False)
    assert c.teacache == 0.3 and c.attention == "flash"
    default = sampler_config(compile_plan(parse_storyboard("title: d\nshots: [{id: a, prompt: x, frames: 17}]", tmp_path)).shots[0])
    assert (default.batched_cfg, default.teacache, default.compile, default.attention, default.offload) == (
        True, 0.0, False, "sdpa", False,
    )


# ------------------------------------------------------------------------------------------------------ offload


def _job(offload: bool):
    from skyray.executors.worker import WindowJob

    cfg = S.SamplerConfig(steps=2, offload=offload)
    return WindowJob("s", shot_windows(5, 5, 0)[0], 1, PROMPT, NEG, cfg, seed=1, height=32, width=32, handoff_latents=0)


def _spy_moves(monkeypatch, comps):
    moves = []
    for name in ("text_encoder", "transformer"):
        module = getattr(comps, name)
        real = module.to

        def to(*args, _real=real, _name=name, **kw):
            moves.append((_name, str(torch.device(args[0] if args else kw["device"]))))
            return _real(*args, **kw)

        monkeypatch.setattr(module, "to", to)
    return moves


def test_offload_moves_models_between_stages(monkeypatch):
    # On a CPU-only machine every module is already on the CPU: what can be checked is that the moves happen,
    # in order. The gpu test below checks where the modules end up.
    from skyray.executors.worker import Worker

    worker = Worker("tiny", "cpu")
    moves = _spy_moves(monkeypatch, worker.components)
    out = worker.render_window(_job(offload=True), None)
    assert moves == [("text_encoder", "cpu"), ("text_encoder", "cpu"), ("transformer", "cpu"), ("transformer", "cpu")]
    # to the device to encode, back to the CPU; to the device to sample, to the CPU before the writer decodes
    moves.clear()
    worker.render_window(_job(offload=True), None)  # prompts cached: the text encoder stays where it is
    assert moves == [("transformer", "cpu"), ("transformer", "cpu")]
    moves.clear()
    plain = Worker("tiny", "cpu")
    plain_moves = _spy_moves(monkeypatch, plain.components)
    ref = plain.render_window(_job(offload=False), None)
    assert plain_moves == []
    assert torch.equal(out.latents, ref.latents)


@pytest.mark.gpu
def test_offload_leaves_the_gpu_to_the_decoder():
    from skyray.executors.worker import Worker

    worker = Worker("tiny", "cuda")
    worker.render_window(_job(offload=True), None)
    c = worker.components
    assert next(c.text_encoder.parameters()).device.type == "cpu"
    assert next(c.transformer.parameters()).device.type == "cpu"
    assert next(c.vae.parameters()).device.type == "cuda"
    worker.render_window(_job(offload=False), None)
    assert next(c.transformer.parameters()).device.type == "cuda"
