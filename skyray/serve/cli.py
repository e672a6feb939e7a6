"""``skyray serve``: run the HTTP API on Ray Serve until interrupted."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``add_subparsers()`` object."""
    p = sub.add_parser("serve", help="serve shot and film requests over HTTP (Ray Serve)",
                       description="Serve shot and film requests over HTTP. Settings not given here come from "
                       "SKYRAY_* environment variables; tokens only from SKYRAY_API_TOKEN.")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--model", action="append", dest="models",
                   help="model to serve (repeat for several; default: tiny)")
    p.add_argument("--device", help="torch device of the renderers (default: cuda when available)")
    p.add_argument("--data-dir", help="folder for jobs.sqlite and job outputs (default ./skyray-data)")
    p.add_argument("--address", help="Ray address to join ('auto'); default: start a local Ray")
    p.add_argument("--min-replicas", type=int, help="renderer replicas per model, at least")
    p.add_argument("--max-replicas", type=int, help="renderer replicas per model, at most")
    p.add_argument("--gpus-per-replica", type=int, help="GPUs per renderer (0: CPU only)")
    p.add_argument("--max-queue", type=int, help="jobs that may wait before submissions get 429")
    p.add_argument("--ingress-replicas", type=int,
                   help="API replicas sharing the job store (the PostgreSQL DSN comes from SKYRAY_DATABASE_URL)")
    p.add_argument("--insecure-no-auth", action="store_true", default=None,
                   help="accept requests without a bearer token (anyone can submit and see every job)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import ray
    from ray import serve

    from skyray.output.location import redact
    from skyray.serve import build_app
    from skyray.serve.options import OptionsError, ServeOptions

    try:
        options = ServeOptions.from_env(
            host=args.host, port=args.port, models=tuple(args.models) if args.models else None,
            device=args.device, data_dir=args.data_dir, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, gpus_per_replica=args.gpus_per_replica, max_queue=args.max_queue,
            ingress_replicas=args.ingress_replicas,
            insecure_no_auth=args.insecure_no_auth,
        )
        app = build_app(options)
    except OptionsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options.gpus_per_replica and args.address is None and args.gpus_per_replica is None:
        import torch

        if not torch.cuda.is_available():
            options = dataclasses.replace(options, gpus_per_replica=0)
            app = build_app(options)
            print("no CUDA GPU here: renderers reserve CPUs only (--gpus-per-replica 0)", file=sys.stderr)
    if options.insecure_no_auth:
        print("warning: --insecure-no-auth: anyone who can reach this port can render and read every job",
              file=sys.stderr)
    ray.init(address=args.address or "local")
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(app, name="skyray", route_prefix="/")
    print(f"skyray serving {', '.join(options.models)} on http://{options.host}:{options.port} "
          f"(OpenAPI at /openapi.json, job files in {redact(options.outputs_target)}, job store {_store_name(options)}); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _store_name(options) -> str:
    from skyray.serve.store import Database

    if options.database_url:
        return Database(options.database_url).redacted  # never the password
    return str(options.db_path)
