"""Build the Serve application: an ``Ingress`` deployment (``ingress_replicas`` replicas sharing the job store)
and one ``Renderer`` deployment per served model.

A renderer replica is one GPU group: a placement group of ``gpus_per_replica`` bundles packed on one node
(``STRICT_PACK``), the replica itself in the first bundle.  It takes one job at a time and scales between
``min_replicas`` and ``max_replicas`` on the jobs waiting for it (``target_ongoing_requests=1``).
"""

from __future__ import annotations

from ray.serve import Application

from skyray.serve.ingress import Ingress
from skyray.serve.options import ServeOptions
from skyray.serve.renderer import Renderer


def renderer_options(options: ServeOptions, index: int) -> dict:
    """Deployment options of the renderer of ``options.models[index]``."""
    from skyray.executors.ray import EMULATED_SLOT

    gpus, ranks = options.gpus_per_replica, options.ranks_per_replica
    cpus = options.cpus_per_replica
    if ranks > 1:
        # A group: the replica drives (CPU only) from bundle 0; one rank actor per bundle holds a GPU (or a slot).
        unit = {"GPU": 1} if gpus else {EMULATED_SLOT: 1}
        bundles = [{"CPU": cpus, **unit}] + [{"CPU": cpus, **unit} if gpus else dict(unit) for _ in range(ranks - 1)]
        actor = {"num_cpus": cpus, "num_gpus": 0}
    elif gpus:
        bundles = [{"CPU": cpus, "GPU": 1}]
        actor = {"num_cpus": cpus, "num_gpus": 1}
    else:
        bundles = [{"CPU": cpus}]
        actor = {"num_cpus": cpus}
    return {
        "name": "Renderer" if index == 0 else f"Renderer-{index}",
        "ray_actor_options": actor,
        "placement_group_bundles": bundles,
        "placement_group_strategy": "STRICT_PACK",
        "max_ongoing_requests": 1,
        "max_queued_requests": -1,
        "autoscaling_config": {
            "min_replicas": options.min_replicas,
            "initial_replicas": max(options.min_replicas, 1),
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 5,
            "downscale_delay_s": 300,
        },
        "graceful_shutdown_timeout_s": options.graceful_shutdown_s,
        "health_check_timeout_s": 120,  # a replica loading a large model or decoding 720p answers slowly
    }


def build_app(options: ServeOptions) -> Application:
    """The bound application (``serve.run(build_app(opts), route_prefix="/")``); refuses to build without a token
    unless ``insecure_no_auth``."""
    options.check_auth()
    hashes = options.token_hashes
    replica_options = options.for_replicas()
    renderers = {
        model: Renderer.options(**renderer_options(options, i)).bind(replica_options, model)
        for i, model in enumerate(options.models)
    }
    ingress = Ingress.options(num_replicas=options.ingress_replicas)
    return ingress.bind(replica_options, hashes, renderers)
