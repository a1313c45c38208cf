"""Lint of deploy/kuberay/: the RayJob and RayCluster manifests.

No Kubernetes cluster runs here, so the manifests are checked against the
fields KubeRay's ray.io/v1 CRDs define, written down below as data (a summary
of the Go types RayJobSpec, RayClusterSpec, HeadGroupSpec and WorkerGroupSpec
of the KubeRay operator, v1.1 onwards), plus the subset of Kubernetes core/v1
pod fields the manifests use. A misspelt key is dropped silently by the API
server's pruning or rejected by validation; here it fails by name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
KINDS = {
    "rayjob-ppo-vllm.yaml": ("ray.io/v1", "RayJob"),
    "rayjob-remax-vllm.yaml": ("ray.io/v1", "RayJob"),
    "raycluster.yaml": ("ray.io/v1", "RayCluster"),
    "storage-pvc.yaml": ("v1", "PersistentVolumeClaim"),
}
# The preset each RayJob trains: vLLM rollouts + ZeRO-3, 7B-shaped.
PRESETS = {"rayjob-ppo-vllm.yaml": "llama-7b-ppo-vllm", "rayjob-remax-vllm.yaml": "llama-7b-remax-vllm"}
IMAGE = "ghcr.io/rlhf-ray/rlhf-ray:{version}-gpu"

RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
RAYCLUSTER_SPEC = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
# Fields whose JSON tags carry no `omitempty` in the v1 types.
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}

# Kubernetes core/v1: a subset of each type's fields, wide enough for these manifests.
POD_TEMPLATE = {"metadata", "spec"}
POD_SPEC = {
    "affinity", "automountServiceAccountToken", "containers", "dnsPolicy", "hostIPC", "hostNetwork",
    "imagePullSecrets", "initContainers", "nodeSelector", "priorityClassName", "restartPolicy",
    "runtimeClassName", "schedulerName", "securityContext", "serviceAccountName",
    "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes",
}
CONTAINER = {
    "name", "image", "imagePullPolicy", "command", "args", "workingDir", "env", "envFrom", "ports",
    "resources", "volumeMounts", "volumeDevices", "lifecycle", "livenessProbe", "readinessProbe",
    "startupProbe", "securityContext", "stdin", "tty", "terminationMessagePath", "terminationMessagePolicy",
}
RESOURCES = {"requests", "limits", "claims"}
VOLUME = {"name", "emptyDir", "persistentVolumeClaim", "hostPath", "secret", "configMap", "nfs", "csi",
          "projected", "ephemeral"}
EMPTY_DIR = {"medium", "sizeLimit"}
VOLUME_MOUNT = {"name", "mountPath", "subPath", "readOnly", "mountPropagation", "subPathExpr"}


def load(name: str) -> dict:
    documents = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert len(documents) == 1, f"deploy/kuberay/{name}: expected one YAML document, found {len(documents)}"
    return documents[0]


def cluster_spec(manifest: dict) -> dict:
    spec = manifest.get("spec", {})
    return spec.get("rayClusterSpec", {}) if manifest.get("kind") == "RayJob" else spec


def pod_templates(manifest: dict) -> list[tuple[str, dict]]:
    """`[(group, pod template)]`: the head group first, then each worker group."""
    spec = cluster_spec(manifest)
    groups = [("headGroupSpec", spec.get("headGroupSpec", {}))]
    groups += [(f"workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs", [])]
    return [(where, group.get("template", {})) for where, group in groups]


def unknown_fields(manifest: dict) -> list[str]:
    """Every key outside the known field sets, as `path.key`."""
    errors: list[str] = []

    def check(obj, allowed: set[str], where: str, required: set[str] = frozenset()):
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a mapping, got {type(obj).__name__}")
            return
        errors.extend(f"{where}.{key}: not a field of {where.rsplit('.', 1)[-1]} (known: {', '.join(sorted(allowed))})"
                      for key in obj if key not in allowed)
        errors.extend(f"{where}: required field {key!r} is missing" for key in sorted(required - obj.keys()))

    spec = manifest.get("spec", {})
    if manifest.get("kind") == "RayJob":
        check(spec, RAYJOB_SPEC, "spec")
        spec, prefix = spec.get("rayClusterSpec", {}), "spec.rayClusterSpec"
    else:
        prefix = "spec"
    check(spec, RAYCLUSTER_SPEC, prefix, {"headGroupSpec"})
    check(spec.get("headGroupSpec", {}), HEAD_GROUP, f"{prefix}.headGroupSpec", HEAD_GROUP_REQUIRED)
    for index, group in enumerate(spec.get("workerGroupSpecs", [])):
        check(group, WORKER_GROUP, f"{prefix}.workerGroupSpecs[{index}]", WORKER_GROUP_REQUIRED)
    for where, template in pod_templates(manifest):
        check(template, POD_TEMPLATE, f"{where}.template", {"spec"})
        pod = template.get("spec", {})
        check(pod, POD_SPEC, f"{where}.template.spec", {"containers"})
        for container in pod.get("containers", []):
            at = f"{where}.containers[{container.get('name')}]"
            check(container, CONTAINER, at, {"name", "image"})
            check(container.get("resources", {}), RESOURCES, f"{at}.resources")
            for mount in container.get("volumeMounts", []):
                check(mount, VOLUME_MOUNT, f"{at}.volumeMounts", {"name", "mountPath"})
        for volume in pod.get("volumes", []):
            check(volume, VOLUME, f"{where}.volumes[{volume.get('name')}]", {"name"})
            if "emptyDir" in volume:
                check(volume["emptyDir"] or {}, EMPTY_DIR, f"{where}.volumes[{volume.get('name')}].emptyDir")
    return errors


def ray_manifests() -> list[str]:
    return [name for name, (api, _) in KINDS.items() if api == "ray.io/v1"]


def test_every_yaml_in_the_folder_is_linted_here():
    assert sorted(p.name for p in KUBERAY.glob("*.y*ml")) == sorted(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_manifest_parses_with_its_api_version_and_kind(name):
    manifest = load(name)
    assert (manifest["apiVersion"], manifest["kind"]) == KINDS[name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])


@pytest.mark.parametrize("name", ray_manifests())
def test_every_key_is_a_field_of_the_crd(name):
    errors = unknown_fields(load(name))
    assert not errors, f"deploy/kuberay/{name}:\n" + "\n".join(errors)


def test_an_unknown_or_missing_field_is_named():
    manifest = load("rayjob-ppo-vllm.yaml")
    broken = copy.deepcopy(manifest)
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    group = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replica"] = group.pop("replicas")
    del group["maxReplicas"]
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    errors = "\n".join(unknown_fields(broken))
    assert "spec.shutdownAfterJobFinish: not a field of spec" in errors
    assert "workerGroupSpecs[0].replica: not a field" in errors
    assert "workerGroupSpecs[0]: required field 'maxReplicas' is missing" in errors
    assert "containers[ray-head].volumeMount: not a field" in errors


@pytest.mark.parametrize("name", ray_manifests())
def test_ray_start_params_are_strings_and_group_sizes_are_consistent(name):
    spec = cluster_spec(load(name))
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for key, value in group["rayStartParams"].items():
            # map[string]string in the CRD: an unquoted number fails validation.
            assert isinstance(value, str), f"{name}: rayStartParams.{key} = {value!r} must be a quoted string"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "keep training actors off the head"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def worker_gpus(manifest: dict) -> int:
    return sum(group["replicas"] * gpu_limit(group["template"]["spec"]["containers"][0])
               for group in cluster_spec(manifest)["workerGroupSpecs"])


@pytest.mark.parametrize("name", ray_manifests())
def test_workers_have_gpu_limits_and_the_head_none(name):
    manifest = load(name)
    for where, template in pod_templates(manifest):
        ray_container = template["spec"]["containers"][0]
        if where == "headGroupSpec":
            assert gpu_limit(ray_container) == 0, f"{name}: the head should not hold GPUs"
            continue
        limits = ray_container["resources"]["limits"]
        assert gpu_limit(ray_container) > 0, f"{name}: {where} has no nvidia.com/gpu limit"
        requested = ray_container["resources"].get("requests", {}).get("nvidia.com/gpu", limits["nvidia.com/gpu"])
        assert requested == limits["nvidia.com/gpu"], f"{name}: {where} GPU requests must equal limits"
        assert any(t.get("key") == "nvidia.com/gpu" for t in template["spec"].get("tolerations", [])), where


def test_remax_needs_fewer_gpus_than_ppo_because_it_has_no_critic():
    ppo, remax = worker_gpus(load("rayjob-ppo-vllm.yaml")), worker_gpus(load("rayjob-remax-vllm.yaml"))
    assert 0 < remax < ppo, f"ReMax workers hold {remax} GPUs, PPO workers {ppo}"
    assert "no critic" in (KUBERAY / "rayjob-remax-vllm.yaml").read_text()


@pytest.mark.parametrize("name", ray_manifests())
def test_shm_is_a_memory_volume_mounted_at_dev_shm(name):
    for where, template in pod_templates(load(name)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert "/dev/shm" in mounts, f"{name}: {where} does not mount /dev/shm"
        shm = volumes[mounts["/dev/shm"]]
        assert shm.get("emptyDir", {}).get("medium") == "Memory", f"{name}: {where} /dev/shm is not memory-backed"


def entrypoint_args(name: str) -> list[str]:
    return load(name)["spec"]["entrypoint"].split()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_entrypoint_trains_the_gpu_preset(name):
    args = entrypoint_args(name)
    assert args[:2] == ["rlhf-ray", "train"], f"{name}: entrypoint must start with `rlhf-ray train`"
    assert args[2] == PRESETS[name], f"{name}: trains {args[2]!r}, expected the preset {PRESETS[name]!r}"
    overrides = dict(arg.split("=", 1) for arg in args[3:])
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", key) for key in overrides), overrides
    assert overrides["run.output_dir"].startswith("/mnt/runs/")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_entrypoint_config_loads_and_fits_the_workers(name):
    from rlhf_ray.config import list_config_presets, load_config

    args = entrypoint_args(name)
    assert args[2] in list_config_presets(), f"{name}: preset {args[2]!r} is not shipped in rlhf_ray/config/presets/"
    config = load_config(args[2], args[3:])
    assert config.rollout.engine == "vllm", f"{args[2]}: the manifests are for vLLM rollouts"
    roles = [config.policy, config.reference, config.reward, config.critic]
    needed = sum(role.num_ranks * role.num_gpus_per_rank for role in roles
                 if getattr(role, "enabled", True) and not getattr(role, "rule", ""))
    needed += config.rollout.num_engines * config.rollout.num_gpus_per_engine
    assert 0 < needed <= worker_gpus(load(name)), (
        f"{args[2]} asks for {needed:g} GPUs; deploy/kuberay/{name} gives its workers {worker_gpus(load(name))}")


def absolute_paths(value) -> list[str]:
    """Every string in a (nested) config dict that is an absolute path."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in absolute_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_path_the_job_reads_or_writes_is_on_the_shared_claim(name):
    from rlhf_ray.config import load_config, to_dict

    args = entrypoint_args(name)
    paths = absolute_paths(to_dict(load_config(args[2], args[3:])))
    assert any(p.startswith("/mnt/runs/") for p in paths), paths
    claim = load("storage-pvc.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes write run directories"
    for where, template in pod_templates(load(name)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        for path in paths:
            mount = next((m for m in mounts if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")), None)
            assert mount, f"{name}: {where} mounts nothing at {path} (named by the {args[2]} config)"
            claim_name = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim_name == claim["metadata"]["name"], f"{name}: {where} {path} is not on the shared claim"
        # The image runs as uid 1000; fsGroup makes the volume writable for it.
        assert template["spec"]["securityContext"]["fsGroup"] == 1000, where


def dockerfile_arg(path: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.relative_to(ROOT)}: no `ARG {name}=...` line"
    return match.group(1)


@pytest.mark.parametrize("name", ray_manifests())
def test_ray_version_and_image_match_the_package_and_the_images(name):
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = cluster_spec(load(name))
    version = spec["rayVersion"]
    ray = next(r for r in map(Requirement, project["dependencies"]) if r.name == "ray")
    assert ray.specifier.contains(version), f"{name}: rayVersion {version} is outside pyproject's {ray}"
    for kind in ("gpu", "cpu"):
        image_ray = dockerfile_arg(ROOT / "docker" / f"Dockerfile.{kind}", "RAY_VERSION")
        assert image_ray == version, f"{name}: rayVersion {version} but docker/Dockerfile.{kind} installs ray {image_ray}"
    images = {c["image"] for _, t in pod_templates(load(name)) for c in t["spec"]["containers"]}
    assert images == {IMAGE.format(version=project["version"])}, f"{name}: images {images}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_rayjob_cleans_up_after_itself(name):
    spec = load(name)["spec"]
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0


@pytest.mark.parametrize("name", ray_manifests())
def test_job_server_is_not_published(name):
    head = cluster_spec(load(name))["headGroupSpec"]
    # A ClusterIP service (the default) and no ingress: port 8265 stays in the cluster.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
