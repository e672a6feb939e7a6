"""The KubeRay manifests in cluster/: valid against KubeRay's CRDs and Ray's Serve schema, consistent with each
other, with the image layout (cluster/Dockerfile) and with cluster/values.yaml, and exactly what the renderer
(skyray.cluster) writes."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from skyray import cluster

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"

# ---------------------------------------------------------------------------------------------------------------
# Walking the manifests


def cluster_specs(by_kind: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    """(kind, RayCluster spec) for the RayCluster, the RayJob's own cluster and the RayService's cluster."""
    for doc in by_kind["RayCluster"]:
        yield "RayCluster", doc["spec"]
    for doc in by_kind["RayJob"]:
        yield "RayJob", doc["spec"]["rayClusterSpec"]
    for doc in by_kind["RayService"]:
        yield "RayService", doc["spec"]["rayClusterConfig"]


def pod_templates(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def all_pod_templates(by_kind: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    for kind, spec in cluster_specs(by_kind):
        for group, template in pod_templates(spec):
            yield f"{kind}/{group}", template


def containers(by_kind: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    for where, template in all_pod_templates(by_kind):
        for c in template["spec"]["containers"]:
            yield f"{where}/{c['name']}", c


def serve_config(by_kind: dict[str, list[dict]]) -> dict:
    return yaml.safe_load(by_kind["RayService"][0]["spec"]["serveConfigV2"])


def deployment(config: dict, name: str) -> dict:
    (app,) = config["applications"]
    (found,) = [d for d in app["deployments"] if d["name"] == name]
    return found


def mounted_volume(template: dict, path: str) -> dict | None:
    """The pod volume whose mount in the Ray container covers ``path``, or None."""
    ray = template["spec"]["containers"][0]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    for mount in ray.get("volumeMounts", []):
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return volumes[mount["name"]]
    return None


def gpu_limit(template: dict) -> int:
    return int(template["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


# ---------------------------------------------------------------------------------------------------------------
# No drift: the committed files are the renderer's output


def test_committed_manifests_equal_rendering(committed: dict[str, list[dict]]) -> None:
    rendered = cluster.render_manifests()
    assert sorted(committed) == sorted(rendered), "cluster/*.yaml and render_manifests() name different files"
    for name, docs in rendered.items():
        # Through YAML and back, so the comparison is of what kubectl would read.
        assert committed[name] == list(yaml.safe_load_all(cluster.dump_documents(docs))), (
            f"cluster/{name} differs from the rendering: run `python -m skyray.cluster render --out cluster`"
        )


def test_cli_writes_the_committed_files(tmp_path: Any) -> None:
    assert cluster.main(["render", "--out", str(tmp_path)]) == 0
    for path in tmp_path.iterdir():
        assert path.read_text() == (CLUSTER / path.name).read_text(), path.name


def test_values_file_sets_every_setting(values: dict) -> None:
    assert set(values) == set(cluster.ClusterSettings.model_fields), "cluster/values.yaml and ClusterSettings differ"


# ---------------------------------------------------------------------------------------------------------------
# Schemas: KubeRay's CRDs, core/v1 as embedded in them, Ray's ServeDeploySchema


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_custom_resources_validate_against_kuberay_crds(
    kind: str, by_kind: dict[str, list[dict]], crd_validators: dict[str, Callable]
) -> None:
    docs = by_kind[kind]
    assert docs, f"no {kind} in cluster/"
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_validators[kind](doc) == []
        assert crd_validators["ObjectMeta"](doc["metadata"]) == []
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_core_resources_validate_against_embedded_schemas(
    by_kind: dict[str, list[dict]], crd_validators: dict[str, Callable]
) -> None:
    for svc in by_kind["Service"]:
        assert svc["apiVersion"] == "v1"
        assert crd_validators["Service"](svc) == []
    claims = by_kind["PersistentVolumeClaim"]
    assert {c["metadata"]["name"] for c in claims} == {cluster.MODEL_CACHE_CLAIM, cluster.OUTPUT_CLAIM}
    for claim in claims:
        assert claim["apiVersion"] == "v1"
        assert crd_validators["ObjectMeta"](claim["metadata"]) == []
        assert crd_validators["PersistentVolumeClaimSpec"](claim["spec"]) == []
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray pod mounts it"


def _drop_max_replicas(doc: dict) -> None:
    del doc["spec"]["workerGroupSpecs"][0]["maxReplicas"]


def _min_replicas_as_string(doc: dict) -> None:
    doc["spec"]["workerGroupSpecs"][0]["minReplicas"] = "1"


def _num_cpus_as_int(doc: dict) -> None:
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _misspelt_field(doc: dict) -> None:
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")


def _bad_gpu_quantity(doc: dict) -> None:
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = (
        "4 GPUs"
    )


def _duplicate_volume(doc: dict) -> None:
    volumes = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"]
    volumes.append(copy.deepcopy(volumes[0]))


def _replicas_past_int32(doc: dict) -> None:
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**31


def _unknown_autoscaler_version(doc: dict) -> None:
    doc["spec"]["autoscalerOptions"]["version"] = "v3"


def _cel_guarded_field(doc: dict) -> None:
    doc["spec"]["managedBy"] = "ray.io/kuberay-operator"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_drop_max_replicas, "'maxReplicas' is a required property"),
        (_min_replicas_as_string, "'1' is not of type 'integer'"),
        (_num_cpus_as_int, "0 is not of type 'string'"),
        (_misspelt_field, "'workerGroupSpec' was unexpected"),
        (_bad_gpu_quantity, "'4 GPUs' does not match"),
        (_duplicate_volume, "share the list-map key {'name': 'dshm'}"),
        (_replicas_past_int32, "is not a 'int32'"),
        (_unknown_autoscaler_version, "'v3' is not one of ['v1', 'v2']"),
        (_cel_guarded_field, "cannot be checked offline"),
    ],
)
def test_crd_validation_rejects_broken_manifests(
    breakage: Callable[[dict], None], expected: str, raycluster_doc: dict, crd_validators: dict[str, Callable]
) -> None:
    breakage(raycluster_doc)
    errors = crd_validators["RayCluster"](raycluster_doc)
    assert any(expected in e for e in errors), errors


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if found := _model_in(arg):
            return found
    return None


def unknown_serve_keys(model: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """Keys pydantic would silently drop: Serve's schemas ignore unknown fields, so a typo would pass unnoticed."""
    if isinstance(data, list):
        return [k for i, item in enumerate(data) for k in unknown_serve_keys(model, item, f"{path}[{i}]")]
    if not isinstance(data, dict):
        return []
    unknown = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{path}.{key}")
        elif sub := _model_in(field.annotation):
            unknown += unknown_serve_keys(sub, value, f"{path}.{key}")
    return unknown


def check_serve_config(config: dict) -> None:
    """Ray's own checks: the ServeDeploySchema, the autoscaling config it keeps as a plain dict, and the replica
    config Serve builds on deploy (strategy name, actor options inside the first bundle)."""
    from ray.serve._private.config import ReplicaConfig
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    assert unknown_serve_keys(ServeDeploySchema, config) == []
    for app in config["applications"]:
        for d in app["deployments"]:
            if "autoscaling_config" in d:
                assert unknown_serve_keys(AutoscalingConfig, d["autoscaling_config"]) == []
                AutoscalingConfig.model_validate(d["autoscaling_config"])
            ReplicaConfig.create(
                app["import_path"],
                ray_actor_options=d.get("ray_actor_options"),
                placement_group_bundles=d.get("placement_group_bundles"),
                placement_group_strategy=d.get("placement_group_strategy"),
            )


def test_serve_config_validates_with_ray_serve_schema(by_kind: dict[str, list[dict]]) -> None:
    assert isinstance(by_kind["RayService"][0]["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    check_serve_config(serve_config(by_kind))


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda r: r.update(max_ongoing_request=1), "unknown keys"),
        (lambda r: r.update(placement_group_strategy="STRICTPACK"), "Invalid placement group strategy"),
        (lambda r: r["ray_actor_options"].update(num_gpus=2), "must be a subset of the first bundle"),
        (lambda r: r["autoscaling_config"].update(min_replicas=-1), "min_replicas"),
        (lambda r: r.update(num_replicas=2), "num_replicas"),
    ],
)
def test_serve_checks_reject_broken_configs(
    breakage: Callable[[dict], Any], expected: str, by_kind: dict[str, list[dict]]
) -> None:
    config = serve_config(by_kind)
    breakage(deployment(config, "Renderer"))
    with pytest.raises((ValidationError, ValueError, AssertionError)) as failure:
        check_serve_config(config)
    message = str(failure.value)
    if expected == "unknown keys":
        assert "max_ongoing_request" in message
    else:
        assert expected in message


# ---------------------------------------------------------------------------------------------------------------
# GPUs, groups and scheduling


def test_renderer_is_one_strict_pack_group_per_replica(by_kind: dict[str, list[dict]], values: dict) -> None:
    config = serve_config(by_kind)
    (app,) = config["applications"]
    assert app["import_path"] == "skyray.serve:app"
    assert app["route_prefix"] == "/"
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "Renderer"}
    renderer = deployment(config, "Renderer")
    assert renderer["placement_group_strategy"] == "STRICT_PACK"
    assert renderer["placement_group_bundles"] == [{"CPU": cluster.BUNDLE_CPUS, "GPU": 1}] * values["gpus_per_group"]
    assert renderer["max_ongoing_requests"] == 1
    scaling = renderer["autoscaling_config"]
    assert scaling["target_ongoing_requests"] == 1
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (values["min_groups"], values["max_groups"])
    assert "ray_actor_options" in renderer


def test_worker_pods_hold_whole_groups(by_kind: dict[str, list[dict]], values: dict) -> None:
    bundles = len(deployment(serve_config(by_kind), "Renderer")["placement_group_bundles"])
    group = values["gpus_per_group"]
    assert bundles == group
    for kind, spec in cluster_specs(by_kind):
        for worker in spec["workerGroupSpecs"]:
            assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(worker)
            assert 0 <= worker["minReplicas"] <= worker["maxReplicas"]
            gpus = gpu_limit(worker["template"])
            assert gpus > 0 and gpus % group == 0 and gpus % bundles == 0, f"{kind}: {gpus} GPUs per pod"
            requests = worker["template"]["spec"]["containers"][0]["resources"]["requests"]
            assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, "GPU requests must equal limits"
    # The Serve ceiling fits in the RayService's worker ceiling: max_replicas groups of K GPUs each.
    service_workers = by_kind["RayService"][0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    capacity = sum(w["maxReplicas"] * gpu_limit(w["template"]) // group for w in service_workers)
    assert capacity >= values["max_groups"]


def test_gpu_pods_tolerate_gpu_taints_and_pick_the_gpu_type(by_kind: dict[str, list[dict]], values: dict) -> None:
    for where, template in all_pod_templates(by_kind):
        if gpu_limit(template):
            tolerations = template["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations), where
            assert template["spec"].get("nodeSelector", {}) == values["gpu_node_selector"], where


def test_heads_take_no_work_and_no_gpus(by_kind: dict[str, list[dict]]) -> None:
    for kind, spec in cluster_specs(by_kind):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", kind
        assert gpu_limit(spec["headGroupSpec"]["template"]) == 0, kind


def test_long_running_clusters_autoscale_with_v2(by_kind: dict[str, list[dict]]) -> None:
    for kind, spec in cluster_specs(by_kind):
        if kind == "RayJob":
            continue  # a film's cluster is sized for it up front
        assert spec["enableInTreeAutoscaling"] is True, kind
        assert spec["autoscalerOptions"]["version"] == "v2", kind


def test_pods_have_shared_memory_and_the_model_cache(by_kind: dict[str, list[dict]]) -> None:
    for where, template in all_pod_templates(by_kind):
        shm = mounted_volume(template, "/dev/shm")
        assert shm and shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"], where
        cache = mounted_volume(template, "/models")
        assert cache == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "skyray-model-cache"}}, where


# ---------------------------------------------------------------------------------------------------------------
# Code and image layout the manifests point at


def test_serve_import_path_names_a_module_that_defines_app(by_kind: dict[str, list[dict]], monkeypatch) -> None:
    from ray.serve import Application

    (app,) = serve_config(by_kind)["applications"]
    module, attribute = app["import_path"].split(":")
    spec = importlib.util.find_spec(module)
    # A folder without __init__.py is a namespace package: found, but nothing Serve could import `app` from.
    assert spec is not None and spec.origin is not None, f"{module} is not an importable module yet"
    # Resolve the attribute the way Serve will, with the app's own environment from serveConfigV2 (plus the
    # API token the pods get from their Secret).
    for key, value in app.get("runtime_env", {}).get("env_vars", {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SKYRAY_API_TOKEN", "k8s-secret-token-0123456789")
    bound = getattr(importlib.import_module(module), attribute)
    assert isinstance(bound, Application), f"{module}:{attribute} is a {type(bound).__name__}, not a Serve app"
    # Serve matches serveConfigV2's deployments to the app's by name: an unknown name fails the deploy.
    package = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
    sources = [package] if package.is_file() else sorted(package.rglob("*.py"))
    text = "\n".join(p.read_text() for p in sources)
    for d in app["deployments"]:
        assert re.search(rf"\b{d['name']}\b", text), f"no deployment named {d['name']} in {module}"


def test_rayjob_entrypoint_matches_the_image_layout(by_kind: dict[str, list[dict]], values: dict) -> None:
    (job,) = by_kind["RayJob"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert {"ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec"} <= set(spec)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "/app/render.py"]
    script = REPO / "render.py"  # the Dockerfile copies the repository to /app
    assert script.is_file(), f"the entrypoint runs /app/render.py, and {script} does not exist"
    storyboard, flags = argv[2], dict(zip(argv[3::2], argv[4::2]))
    assert set(flags) <= {"--out", "--address", "--executor", "--groups", "--gpus-per-group"}
    sources = [script, *(REPO / "skyray").rglob("*.py")]
    text = "\n".join(p.read_text() for p in sources)
    for flag in flags:
        assert f'"{flag}"' in text or f"'{flag}'" in text, f"no CLI defines {flag}"

    # The entrypoint is the driver and runs on the head: the storyboard comes from the ConfigMap mounted there.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    assert mounted_volume(head, storyboard) == {"name": "storyboards", "configMap": {"name": "skyray-film"}}
    assert flags["--out"].startswith(values["outputs_uri"].rstrip("/") + "/"), "films go to the object store"
    assert mounted_volume(head, flags["--out"]) is None
    assert flags["--address"] == "auto" and flags["--executor"] == "ray"

    k, groups = int(flags["--gpus-per-group"]), int(flags["--groups"])
    assert (k, groups) == (values["gpus_per_group"], values["job_groups"])
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert sum(w["replicas"] * (gpu_limit(w["template"]) // k) for w in workers) >= groups


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile(), re.MULTILINE))


def test_dockerfile_builds_the_layout_the_manifests_expect(by_kind: dict[str, list[dict]], values: dict) -> None:
    text, args = dockerfile(), dockerfile_args()
    final_stage = text[text.rindex("\nFROM ") :]
    assert re.match(r"\nFROM nvidia/cuda:\$\{CUDA_VERSION\}-runtime-ubuntu", final_stage)
    assert args["PYTHON_VERSION"] == "3.11" and args["TORCH_VERSION"] == "2.13.0"
    torch_first = final_stage.index("pip install --no-cache-dir torch==${TORCH_VERSION}")
    assert torch_first < final_stage.index('".[gpu]"'), "torch is installed, pinned, before skyray[gpu]"
    assert "WORKDIR /app" in final_stage and "COPY . /app" in final_stage
    for download in ("snapshot_download", "huggingface-cli download", "hf download", "from_pretrained"):
        assert download not in text, "weights are downloaded at run time into the cache volume, not baked in"

    user = re.findall(r"^USER (\S+)", final_stage, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    uid = int(re.search(r"useradd --uid (\d+)", final_stage).group(1))
    assert user[-1] in (str(uid), "ray")
    for where, template in all_pod_templates(by_kind):
        assert template["spec"]["securityContext"]["runAsUser"] == uid, where

    hf_home = re.search(r"HF_HOME=(\S+)", final_stage).group(1)
    for where, template in all_pod_templates(by_kind):
        volume = mounted_volume(template, hf_home) or {}
        assert volume.get("persistentVolumeClaim", {}).get("claimName") == "skyray-model-cache", where


def test_image_and_ray_versions_agree_everywhere(
    committed: dict[str, list[dict]], by_kind: dict[str, list[dict]], values: dict
) -> None:
    image = f"{values['image']}:{values['tag']}"
    for where, c in containers(by_kind):
        assert c["image"] == image, where
    (kustomization,) = committed["kustomization.yaml"]
    assert kustomization["images"] == [{"name": values["image"], "newName": values["image"], "newTag": values["tag"]}]
    for kind, spec in cluster_specs(by_kind):
        assert spec["rayVersion"] == values["ray_version"] == dockerfile_args()["RAY_VERSION"], kind


def test_kustomization_lists_the_long_running_resources(committed: dict[str, list[dict]]) -> None:
    (kustomization,) = committed["kustomization.yaml"]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (CLUSTER / resource).is_file(), resource
    kinds = {doc["kind"] for name in kustomization["resources"] for doc in committed[name]}
    assert kinds == {"PersistentVolumeClaim", "RayCluster", "RayService", "Service"}


def test_api_token_comes_from_the_secret(by_kind: dict[str, list[dict]]) -> None:
    want = {"name": "SKYRAY_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "skyray-api-token", "key": "token"}}}
    service_cluster = by_kind["RayService"][0]["spec"]["rayClusterConfig"]
    for group, template in pod_templates(service_cluster):
        for c in template["spec"]["containers"]:
            assert want in c.get("env", []), f"RayService/{group}/{c['name']}"
    for where, c in containers(by_kind):
        for env in c.get("env", []):
            assert not (env["name"] == "SKYRAY_API_TOKEN" and "value" in env), f"{where}: token in plain text"


def test_job_database_is_postgres_from_a_secret_never_sqlite_on_the_volume(
    by_kind: dict[str, list[dict]], values: dict, monkeypatch
) -> None:
    want = {"name": "SKYRAY_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": values["database_secret"], "key": "url"}}}
    service_cluster = by_kind["RayService"][0]["spec"]["rayClusterConfig"]
    for group, template in pod_templates(service_cluster):
        for c in template["spec"]["containers"]:
            assert want in c.get("env", []), f"RayService/{group}/{c['name']}"
    for where, c in containers(by_kind):
        for env in c.get("env", []):
            assert env["name"] != "SKYRAY_DATABASE_URL" or "value" not in env, f"{where}: DSN in plain text"
    config = serve_config(by_kind)
    (app,) = config["applications"]
    env = app["runtime_env"]["env_vars"]
    assert "SKYRAY_JOB_DB" not in env
    # What the replicas build from that env (plus the Secret's DSN): the store is the DSN, not a file.
    from skyray.serve.options import ServeOptions

    opts = ServeOptions.from_env({**env, "SKYRAY_DATABASE_URL": "postgresql://u:p@db:5432/skyray",
                                  "SKYRAY_API_TOKEN": "x" * 20})
    assert opts.store_target == "postgresql://u:p@db:5432/skyray"
    assert opts.ingress_replicas == values["ingress_replicas"] == deployment(config, "Ingress")["num_replicas"] >= 2
    assert opts.job_ttl_s == values["serve_job_ttl_seconds"]


def test_trial_postgres_on_its_own_volume(committed: dict[str, list[dict]], crd_schemas: dict[str, dict],
                                          crd_validators: dict[str, Callable], values: dict) -> None:
    from tests.cluster.conftest import make_validator, subschema

    statefulset, svc = committed["postgres.yaml"]
    assert (statefulset["apiVersion"], statefulset["kind"]) == ("apps/v1", "StatefulSet")
    spec = statefulset["spec"]
    pod_template = make_validator(subschema(crd_schemas["RayCluster"], "spec.headGroupSpec.template"))
    assert pod_template(spec["template"]) == []
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (claim,) = spec["volumeClaimTemplates"]
    assert crd_validators["PersistentVolumeClaimSpec"](claim["spec"]) == []
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], "the database is not on the shared filesystem"
    (pg,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in pg["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": values["database_secret"],
                                                                     "key": "password"}
    assert crd_validators["Service"](svc) == [] and svc["spec"]["selector"] == spec["selector"]["matchLabels"]
    dsn = cluster.trial_dsn("pw")
    assert f"@{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/{env['POSTGRES_DB']['value']}" in dsn
    assert dsn.startswith(f"postgresql://{env['POSTGRES_USER']['value']}:pw@")
    (kustomization,) = committed["kustomization.yaml"]
    assert ("postgres.yaml" in kustomization["resources"]) == values["postgres_in_cluster"]
    with_db = cluster.render_manifests({"postgres_in_cluster": True})
    assert "postgres.yaml" in with_db["kustomization.yaml"][0]["resources"]


def test_pods_may_take_object_store_credentials_from_a_secret(by_kind: dict[str, list[dict]]) -> None:
    for where, c in containers(by_kind):
        assert {"secretRef": {"name": "skyray-object-store", "optional": True}} in c["envFrom"], where


def test_service_reaches_the_serve_proxy(by_kind: dict[str, list[dict]]) -> None:
    (svc,) = [s for s in by_kind["Service"] if s["metadata"]["name"] == cluster.SERVICE_NAME]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8000, 8000)]
    selector = dict(svc["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"  # KubeRay's label for pods whose Serve proxy is healthy
    head = by_kind["RayService"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert selector.items() <= head["metadata"]["labels"].items()
    assert {"name": "serve", "containerPort": 8000} in head["spec"]["containers"][0]["ports"]
    for kind in ("RayCluster", "RayJob"):
        other = next(t for k, s in cluster_specs(by_kind) if k == kind for _, t in pod_templates(s))
        assert not selector.items() <= other["metadata"]["labels"].items(), f"the Service would also pick {kind} pods"


# ---------------------------------------------------------------------------------------------------------------
# Other settings render consistent, valid manifests too


def test_other_settings_render_valid_consistent_manifests(crd_validators: dict[str, Callable]) -> None:
    manifests = cluster.render_manifests({"gpus_per_group": 8, "groups_per_pod": 2, "max_groups": 5, "job_groups": 3})
    kinds = {doc["kind"]: doc for docs in manifests.values() for doc in docs}
    for kind in ("RayCluster", "RayJob", "RayService"):
        assert crd_validators[kind](kinds[kind]) == []
    (worker,) = kinds["RayCluster"]["spec"]["workerGroupSpecs"]
    assert gpu_limit(worker["template"]) == 16 and worker["maxReplicas"] == 3
    renderer = deployment(yaml.safe_load(kinds["RayService"]["spec"]["serveConfigV2"]), "Renderer")
    assert len(renderer["placement_group_bundles"]) == 8
    (job_worker,) = kinds["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert job_worker["replicas"] == job_worker["maxReplicas"] == 2
    assert "--groups 3 --gpus-per-group 8" in kinds["RayJob"]["spec"]["entrypoint"]


@pytest.mark.parametrize(
    "bad",
    [{"gpus_per_group": 0}, {"min_groups": 5, "max_groups": 2}, {"gpu_per_group": 4}, {"tag": 1.0}],
)
def test_bad_settings_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        cluster.render_manifests(bad)
