"""One render session: a model loaded once, rendering plan after plan.

The CLI (``skyray render``), the Serve renderer replicas and ``skyray batch`` all render through this object:
``prepare`` runs the prompt-enhancer stage and plans a validated storyboard, ``render`` renders a plan into an
output location with hooks for events, cancellation and previews.  The executor (and so the model) is built on
first use and kept until ``close``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from skyray.output.location import OutputLocation
from skyray.plan import FilmPlan, compile_plan
from skyray.render import Event, render_film


@dataclass(frozen=True)
class SessionConfig:
    """Where and how a session renders (validated by whoever builds it: the CLI, Serve or batch)."""

    model: str
    executor: Literal["local", "ray"] = "ray"
    address: str | None = None  # a Ray cluster to join (None: RAY_ADDRESS, a local `ray start`, or a new Ray)
    groups: int = 1
    gpus_per_group: int = 1
    layout: Any = None  # engine.parallel.ParallelConfig, for groups of several GPUs
    guidance: bool = True
    writers: int = 2
    decode_gpu: float = 0.0
    device: str | None = None  # the local executor's torch device
    progress: bool = True
    offload: bool = False
    placement_group: Any = None  # bundles reserved by the caller (a Serve replica's own)
    use_gpu: bool | None = None
    start_timeout_s: float = 300.0  # how long a group may wait for resources (then a clear error)


class RenderSession:
    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._executor = None
        self._last_checkpoint: bytes | None = None
        self._vae = None

    @property
    def executor(self):
        """The executor, built (and the model loaded) on first use."""
        if self._executor is None:
            c = self.config
            if c.executor == "local":
                from skyray.executors.local import LocalExecutor

                self._executor = LocalExecutor(c.model, c.device, offload=c.offload)
            else:
                from skyray.executors.ray import RayExecutor

                self._executor = RayExecutor(
                    c.model, groups=c.groups, gpus_per_group=c.gpus_per_group, address=c.address,
                    parallel=c.layout if c.gpus_per_group > 1 else None, guidance=c.guidance,
                    max_writers=c.writers, decode_gpu=c.decode_gpu, progress=c.progress,
                    placement_group=c.placement_group, offload=c.offload, use_gpu=c.use_gpu,
                    start_timeout_s=c.start_timeout_s)
        return self._executor

    def prepare(self, storyboard, plan: FilmPlan | None = None, quiet: bool = True):
        """The enhancer stage (only for shots that ask for it) and the plan: ``(storyboard, plan)``."""
        from skyray.enhance import enhance_before_render

        plan = plan or compile_plan(storyboard)
        return enhance_before_render(storyboard, plan, use_ray=self.config.executor == "ray",
                                     address=self.config.address, quiet=quiet)

    def render(
        self,
        plan: FilmPlan,
        out: str | Path | OutputLocation,
        save_latents: bool = False,
        on_event: Callable[[Event], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        keep_history: bool = False,
    ) -> dict:
        """Render ``plan`` into ``out`` (the model stays loaded for the next one)."""
        self._last_checkpoint = None
        return render_film(plan, out, self.executor, save_latents=save_latents, on_event=on_event,
                           should_stop=should_stop, on_checkpoint=self._remember, keep_history=keep_history)

    def _remember(self, shot: str, window: int, checkpoint: bytes) -> None:
        self._last_checkpoint = checkpoint

    def preview(self, size: int) -> str | None:
        """The last finished window's last latent as a base64 JPEG at most ``size`` pixels a side (one latent
        decoded without causal context: a glimpse, not the final frame)."""
        if self._last_checkpoint is None or size <= 0:
            return None
        from skyray.output.artifacts import read_window_checkpoint
        from skyray.output.preview import preview_jpeg

        out, _ = read_window_checkpoint(self._last_checkpoint)
        return preview_jpeg(self._preview_vae(), out.latents[:, :, -1:], size)

    def _preview_vae(self):
        worker = getattr(self._executor, "worker", None)
        if worker is not None:
            return worker.components.vae
        if self._vae is None:
            from skyray import models

            self._vae = models.load_vae(self.config.model, "cpu")
        return self._vae

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
