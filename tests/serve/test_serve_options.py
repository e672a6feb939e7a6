"""Serve settings, auth and deployment options, without starting Ray."""

from __future__ import annotations

import argparse

import pytest

from skyray.serve.application import renderer_options
from skyray.serve.auth import TokenAuth
from skyray.serve.options import OptionsError, ServeOptions, token_hash

TOKEN = "a-token-of-twenty-chars"


def test_from_env():
    env = {"SKYRAY_API_TOKEN": f"{TOKEN}, second-token-0123456789", "SKYRAY_MODEL": "tiny,/models/df-1.3b",
           "SKYRAY_MAX_FRAMES": "257", "SKYRAY_INSECURE_NO_AUTH": "false", "SKYRAY_CPUS_PER_REPLICA": "2.5",
           "SKYRAY_DATA_DIR": "/srv/skyray"}
    opts = ServeOptions.from_env(env, max_queue=5, device=None)
    assert opts.tokens == (TOKEN, "second-token-0123456789")
    assert opts.models == ("tiny", "/models/df-1.3b") and opts.default_model == "tiny"
    assert (opts.max_frames, opts.max_queue, opts.cpus_per_replica) == (257, 5, 2.5)
    assert str(opts.db_path) == "/srv/skyray/jobs.sqlite" and str(opts.jobs_dir) == "/srv/skyray/jobs"
    replicas = opts.for_replicas()
    assert replicas.tokens == () and replicas.job_db == "/srv/skyray/jobs.sqlite"
    with pytest.raises(OptionsError, match="SKYRAY_MAX_FRAMES"):
        ServeOptions.from_env({"SKYRAY_MAX_FRAMES": "lots"})
    with pytest.raises(OptionsError, match="min_replicas"):
        ServeOptions(min_replicas=3, max_replicas=2)


def test_refuses_to_start_without_a_token():
    with pytest.raises(OptionsError, match="SKYRAY_API_TOKEN"):
        ServeOptions().check_auth()
    with pytest.raises(OptionsError, match="at least 16"):
        ServeOptions(tokens=("short",)).check_auth()
    ServeOptions(insecure_no_auth=True).check_auth()
    ServeOptions(tokens=(TOKEN,)).check_auth()


def test_app_attribute_is_built_from_the_environment(monkeypatch):
    import skyray.serve

    monkeypatch.delenv("SKYRAY_API_TOKEN", raising=False)
    monkeypatch.delenv("SKYRAY_INSECURE_NO_AUTH", raising=False)
    with pytest.raises(OptionsError):
        skyray.serve.app  # noqa: B018 - `serve run skyray.serve:app` reads this attribute
    monkeypatch.setenv("SKYRAY_API_TOKEN", TOKEN)
    from ray.serve import Application

    assert isinstance(skyray.serve.app, Application)


def test_cli_refuses_without_token(monkeypatch, capsys):
    from skyray.serve.cli import add_serve_parser

    monkeypatch.delenv("SKYRAY_API_TOKEN", raising=False)
    monkeypatch.delenv("SKYRAY_INSECURE_NO_AUTH", raising=False)
    parser = argparse.ArgumentParser(prog="skyray")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", "8123", "--model", "tiny"])
    assert args.func(args) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err


def test_token_auth():
    auth = TokenAuth((token_hash(TOKEN), token_hash("another-token-0123456789")))
    assert auth.owner(f"Bearer {TOKEN}") == token_hash(TOKEN)
    assert auth.owner(f"bearer  {TOKEN} ") == token_hash(TOKEN)
    for bad in (None, "", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer another"):
        assert auth.owner(bad) is None
    assert TokenAuth((), insecure_no_auth=True).owner(None) == ""
    with pytest.raises(ValueError):
        TokenAuth(())


def test_renderer_is_one_strict_pack_group_taking_one_job():
    gpu = renderer_options(ServeOptions(gpus_per_replica=4, cpus_per_replica=8, min_replicas=0, max_replicas=3), 0)
    assert gpu["name"] == "Renderer"
    assert gpu["placement_group_bundles"] == [{"CPU": 8, "GPU": 1}] * 4
    assert gpu["placement_group_strategy"] == "STRICT_PACK"
    # The replica sits in bundle 0 and only drives; its four rank actors hold the four GPUs.
    assert gpu["ray_actor_options"] == {"num_cpus": 8, "num_gpus": 0}
    one = renderer_options(ServeOptions(gpus_per_replica=1, cpus_per_replica=8), 0)
    assert one["placement_group_bundles"] == [{"CPU": 8, "GPU": 1}]
    assert one["ray_actor_options"] == {"num_cpus": 8, "num_gpus": 1}  # a one-GPU replica renders itself
    emulated = renderer_options(ServeOptions(gpus_per_replica=0, emulated_ranks=2, cpus_per_replica=0.5), 0)
    assert emulated["placement_group_bundles"] == [{"CPU": 0.5, "skyray_slot": 1}, {"skyray_slot": 1}]
    assert gpu["max_ongoing_requests"] == 1
    auto = gpu["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (0, 3, 1)
    cpu = renderer_options(ServeOptions(gpus_per_replica=0), 1)
    assert cpu["name"] == "Renderer-1" and cpu["placement_group_bundles"] == [{"CPU": 1.0}]


def test_job_store_replicas_retention_and_quotas_from_env():
    dsn = "postgresql://skyray:s3cret@db.internal:5432/skyray"
    env = {"SKYRAY_DATABASE_URL": dsn, "SKYRAY_INGRESS_REPLICAS": "3", "SKYRAY_JOB_TTL_S": "3600",
           "SKYRAY_QUOTA_QUEUED": "4", "SKYRAY_QUOTA_RUNNING": "1", "SKYRAY_QUOTA_FRAMES_PER_DAY": "10000",
           "SKYRAY_DATA_DIR": "/srv/skyray"}
    opts = ServeOptions.from_env(env)
    assert opts.store_target == dsn and opts.for_replicas().store_target == dsn  # the DSN replaces jobs.sqlite
    assert "s3cret" not in repr(opts)
    assert (opts.ingress_replicas, opts.ttl_s, opts.quota_queued, opts.quota_running, opts.quota_frames_per_day) \
        == (3, 3600.0, 4, 1, 10000)
    assert ServeOptions(job_ttl_s=0).ttl_s is None  # 0 keeps finished jobs
    assert ServeOptions(data_dir="/srv/skyray").store_target == "/srv/skyray/jobs.sqlite"
    with pytest.raises(OptionsError, match="database_url must be a postgresql"):
        ServeOptions(database_url="sqlite:///x.db")
    with pytest.raises(OptionsError, match="quota_running must be >= 0"):
        ServeOptions(quota_running=-1)
    with pytest.raises(OptionsError, match="ingress_replicas must be >= 1"):
        ServeOptions(ingress_replicas=0)
