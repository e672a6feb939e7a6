"""The worker: one model replica that renders windows and decodes shots.

The same class runs in-process (``executors.local``) and inside Ray actors (``executors.ray``); the driver only
sends it small ``WindowJob`` records plus the previous window's ``Handoff``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from skyray.engine.conditioning import encode_image, encode_video_tail
from skyray.engine.handoff import Handoff, WindowOutput
from skyray.engine.sampler import NoisePredictor, SamplerConfig, denoise_window
from skyray.engine.schedule import WindowShape
from skyray.engine.text import PromptCache


def cpu_threads() -> int:
    return int(os.environ.get("SKYRAY_CPU_THREADS", min(4, os.cpu_count() or 1)))


@dataclass(frozen=True)
class WindowJob:
    """Everything a worker needs to render one window (no tensors, no paths: cheap to send to any node)."""

    shot_id: str
    window: WindowShape
    windows: int
    prompt: str
    negative_prompt: str
    sampler: SamplerConfig
    seed: int
    height: int
    width: int
    handoff_latents: int
    # Input files travel as their bytes, read once by the driver: a path is only valid on the node that has it.
    image: bytes | None = None  # first window of an I2V shot
    end_image: bytes | None = None  # last window of a shot with end-frame control
    video: bytes | None = None  # first window of a video extension
    overlap_history: int = 17
    key: str = ""  # the shot's content hash: written into the window's checkpoint, checked on resume


class Worker:
    """Holds a loaded model; ``render_window`` is pure given (job, handoff)."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        parallel=None,
        name: str = "local",
        broadcast: bool = False,
        offload: bool = False,
    ) -> None:
        from skyray import models

        if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
            # The same intra-op thread count in every process (Ray gives actors one thread by default), so a
            # window's latents are bit-identical whichever executor or actor renders it.
            torch.set_num_threads(cpu_threads())
        if broadcast:
            # Ranks of one group: rank 0 reads the checkpoint tensor by tensor and broadcasts each as it is read;
            # every rank assigns it in its final dtype on its final device (weights are read once, held once).
            from skyray.executors.distributed import load_broadcast

            self.components = load_broadcast(model, device or ("cuda" if torch.cuda.is_available() else "cpu"), offload)
        else:
            self.components = models.load(model, device, offload)
        self.prompts = PromptCache(self.components.tokenizer, self.components.text_encoder)
        self.parallel = parallel
        self.name = name
        self.on_row = None  # optional callback(shot_id, window, row, rows) for in-process progress bars
        self._schedulers: dict[float, object] = {}
        self._offloaded = offload  # modules may sit on the CPU (loaded offloaded, or an offloading job ran)

    def _scheduler(self, shift: float):
        if shift not in self._schedulers:
            self._schedulers[shift] = self.components.scheduler_for(shift)
        return self._schedulers[shift]

    def _encode_prompts(self, prompt: str, negative_prompt: str, cfg: SamplerConfig):
        """The window's text embeddings; with ``offload`` the text encoder visits the GPU only to encode."""
        wanted = [prompt, negative_prompt] if cfg.guidance else [prompt]
        if all(p in self.prompts for p in wanted):  # cached: the encoder need not move
            text = self.prompts.embeds(prompt, negative_prompt, cfg.guidance)
        elif not cfg.offload and self.components.device.type != "cuda":
            if self._offloaded:
                self.components.text_encoder.to(self.components.device)
            text = self.prompts.embeds(prompt, negative_prompt, cfg.guidance)
        else:  # offloading, or any GPU: the text encoder lives on the CPU and visits (models.placement)
            self.components.text_encoder.to(self.components.device)
            try:
                text = self.prompts.embeds(prompt, negative_prompt, cfg.guidance)
            finally:
                self.components.text_encoder.to("cpu")
        return text

    @torch.no_grad()
    def render_window(self, job: WindowJob, handoff: Handoff | None) -> WindowOutput:
        t0 = time.perf_counter()
        c = self.components
        cfg = job.sampler
        w = job.window
        h, wl = job.height // 8, job.width // 8
        gen = torch.Generator("cpu")
        if handoff is not None and handoff.rng_state is not None and w.index > 0:
            gen.set_state(handoff.rng_state)
        else:
            gen.manual_seed(job.seed)

        lead: torch.Tensor | None = None  # latents of this shot that precede the window's new ones
        warm = None
        prefix = None
        if w.prefix:
            if w.index == 0 and job.image:
                prefix = lead = encode_image(c.vae, job.image, job.height, job.width)
            elif w.index == 0 and job.video:
                prefix = warm = encode_video_tail(c.vae, job.video, job.overlap_history, w.prefix, job.height, job.width)
            else:
                if handoff is None or handoff.tail is None:
                    raise ValueError(f"shot {job.shot_id!r} window {w.index} needs {w.prefix} handed-off latents")
                prefix = handoff.tail[:, :, -w.prefix :]
        suffix = encode_image(c.vae, job.end_image, job.height, job.width) if w.suffix else None

        text = self._encode_prompts(job.prompt, job.negative_prompt, cfg)
        self._offloaded |= cfg.offload
        if self._offloaded:
            c.transformer.to(c.device)
        predict = NoisePredictor(c.transformer, cfg, self.parallel, family=c.family.name)
        on_row = None
        if self.on_row is not None:
            on_row = lambda r, n: self.on_row(job.shot_id, w.index, r, n)  # noqa: E731
        out = denoise_window(
            predict, self._scheduler(cfg.shift), text, w, (h, wl), gen, prefix=prefix, suffix=suffix, on_row=on_row
        )
        body = out[:, :, : w.prefix + w.new].float().cpu()
        new = body[:, :, w.prefix :]
        if lead is not None:
            new = torch.cat([lead.float().cpu(), new], dim=2)
        tail = body[:, :, -job.handoff_latents :].clone() if job.handoff_latents else None
        if cfg.offload:  # the chain writer decodes next: leave it the GPU
            c.transformer.to("cpu")
        return WindowOutput(
            job.shot_id,
            w.index,
            new.contiguous(),
            Handoff(tail, gen.get_state()),
            warm=None if warm is None else warm.float().cpu(),
            seconds=time.perf_counter() - t0,
            forwards=predict.forwards,
            worker=self.name,
        )
