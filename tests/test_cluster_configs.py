"""Fast checks of the cluster configs in cluster/ (nothing is started).

The AWS launcher config goes through Ray's own schema validation; the KubeRay manifests are checked for the fields
that make them autoscale on GPUs; the IAM policy must grant exactly the configured bucket prefix; no credential
may appear in any of these files.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
GPU_INSTANCE = re.compile(r"^(g\d|p\d)", re.IGNORECASE)  # AWS GPU families: g4dn, g5, g6, p3, p4d, p5, ...
CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def aws():
    return load_yaml(CLUSTER / "aws.yaml")


@pytest.fixture(scope="module")
def policy():
    return json.loads((CLUSTER / "aws-s3-policy.json").read_text())


@pytest.fixture(scope="module")
def kuberay():
    docs = []
    for f in sorted((CLUSTER / "kuberay").glob("*.y*ml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def worker_types(cfg):
    head = cfg["head_node_type"]
    return {name: t for name, t in cfg["available_node_types"].items() if name != head}


def storage(aws_cfg):
    meta = aws_cfg["metadata"]
    return meta["s3_bucket"], meta["s3_prefix"].strip("/")


def containers(pod_template):
    return pod_template["spec"]["containers"]


def walk(obj):
    """Every dict inside a parsed YAML/JSON document."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


# ---------------------------------------------------------------------------------------------- AWS launcher


def test_aws_yaml_passes_ray_validation(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(aws)  # the file as written (what `ray up` reads); raises on a schema error
    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)  # and after Ray merges its AWS defaults
    assert prepared["provider"]["type"] == "aws" and set(worker_types(aws)) <= set(prepared["available_node_types"])


def test_aws_gpu_workers_scale_from_zero(aws):
    gpu_types = {n: t for n, t in worker_types(aws).items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker type with GPUs"
    for name, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0, f"{name}: min_workers must be 0 (scale from zero)"
        assert t.get("max_workers", 0) > 0, f"{name}: max_workers must be > 0"
        assert GPU_INSTANCE.match(t["node_config"]["InstanceType"]), f"{name}: not a GPU instance type"
    gpus = sorted(t["resources"]["GPU"] for t in gpu_types.values())
    assert gpus[0] == 1 and gpus[-1] >= 4, f"want a 1-GPU and a 4/8-GPU type, got {gpus}"
    assert aws["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())
    assert aws["idle_timeout_minutes"] > 0


def test_aws_head_has_no_gpu(aws):
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"])
    assert head["resources"].get("CPU", 0) > 0, "the head runs the search driver: it needs a little CPU"
    assert head.get("max_workers", 0) == 0 and head.get("min_workers", 0) == 0


def test_aws_workers_allow_spot(aws):
    for name, t in worker_types(aws).items():
        market = t["node_config"].get("InstanceMarketOptions", {})
        assert market.get("MarketType") == "spot", f"{name}: spot not allowed"


def test_aws_every_node_has_an_instance_profile(aws):
    for name, t in aws["available_node_types"].items():
        arn = t["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name


def test_aws_image_and_project_are_pinned(aws):
    import ray

    image = aws["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-"), f"{image} is not Ray {ray.__version__}"
    assert not re.search(r":(latest|nightly)", image)
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    setup = " ".join(aws["setup_commands"])
    assert "diffmic" in setup and f"@v{version}" in setup, f"setup_commands do not install diffmic v{version}"


def test_aws_dashboard_not_exposed(aws):
    start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # reached through `ray dashboard` (SSH tunnel) only


def test_aws_yaml_holds_no_credentials():
    text = (CLUSTER / "aws.yaml").read_text()
    for var in CREDENTIAL_VARS:
        assert var not in text, f"{var} in aws.yaml: credentials come from the instance role"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


# ---------------------------------------------------------------------------------------------- IAM policy


def test_policy_grants_exactly_the_prefix(aws, policy):
    bucket, prefix = storage(aws)
    bucket_arn, objects_arn = f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{prefix}/*"
    allowed_object_actions = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    granted = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        assert "NotAction" not in st and "NotResource" not in st and "Principal" not in st
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        assert all("*" not in a for a in actions), f"wildcard action in {actions}"
        for res in resources:
            if res == bucket_arn:  # bucket-level: listing only, and only below the prefix
                assert actions == ["s3:ListBucket"], actions
                prefixes = st["Condition"]["StringLike"]["s3:prefix"]
                prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
                assert prefixes and all(p.startswith(f"{prefix}/") for p in prefixes), prefixes
            else:
                assert res == objects_arn, f"resource {res} is not {objects_arn}"
                assert set(actions) <= allowed_object_actions, actions
        granted |= set(actions)
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= granted


def test_storage_location_is_the_same_everywhere(aws, policy, kuberay):
    bucket, prefix = storage(aws)
    uri = f"s3://{bucket}/{prefix}"
    run_env = " ".join(aws["docker"]["run_options"])
    assert f"DIFFMIC_STORAGE_URI={uri}" in run_env
    assert all(bucket in json.dumps(st["Resource"]) for st in policy["Statement"])
    job = one(kuberay, "RayJob")
    assert f"storage.uri={uri}" in job["spec"]["entrypoint"]
    cluster = one(kuberay, "RayCluster")
    for tpl in [cluster["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["spec"]["workerGroupSpecs"]
    ]:
        for c in containers(tpl):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("DIFFMIC_STORAGE_URI") == uri, c["name"]


# ---------------------------------------------------------------------------------------------- KubeRay


def test_raycluster_autoscales_gpu_workers_from_zero(kuberay):
    import ray

    spec = one(kuberay, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["rayVersion"] == ray.__version__
    groups = spec["workerGroupSpecs"]
    gpu_groups = []
    for g in groups:
        assert g["minReplicas"] == 0 and g["maxReplicas"] > 0, g["groupName"]
        assert g.get("replicas", 0) == 0, g["groupName"]
        for c in containers(g["template"]):
            limits = c["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)) > 0:
                gpu_groups.append(g["groupName"])
                requests = c["resources"].get("requests", {})
                assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"


def test_raycluster_head_has_no_gpu(kuberay):
    head = one(kuberay, "RayCluster")["spec"]["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-gpus", "0")) == "0"
    for c in containers(head["template"]):
        for part in ("limits", "requests"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(part, {})


def test_one_image_everywhere(kuberay):
    cluster, job = one(kuberay, "RayCluster"), one(kuberay, "RayJob")
    spec = cluster["spec"]
    images = {c["image"] for c in containers(spec["headGroupSpec"]["template"])}
    for g in spec["workerGroupSpecs"]:
        images |= {c["image"] for c in containers(g["template"])}
    if "submitterPodTemplate" in job["spec"]:
        images |= {c["image"] for c in containers(job["spec"]["submitterPodTemplate"])}
    if "rayClusterSpec" in job["spec"]:
        rc = job["spec"]["rayClusterSpec"]
        images |= {c["image"] for t in [rc["headGroupSpec"]] + rc["workerGroupSpecs"] for c in containers(t["template"])}
    if "image" in spec.get("autoscalerOptions", {}):
        images.add(spec["autoscalerOptions"]["image"])
    assert len(images) == 1, f"different images: {images}"
    assert not re.search(r":(latest|nightly)$", images.pop())


def test_rayjob_runs_the_search_on_the_cluster(kuberay):
    cluster, job = one(kuberay, "RayCluster"), one(kuberay, "RayJob")
    entry = job["spec"]["entrypoint"]
    assert re.search(r"python\s+\S*tune/search\.py", entry), entry
    assert "storage=s3" in entry and "scaling=gpu" in entry
    selector = job["spec"].get("clusterSelector", {})
    assert selector.get("ray.io/cluster") == cluster["metadata"]["name"] or "rayClusterSpec" in job["spec"]


def test_s3_credentials_only_from_secrets(kuberay):
    referenced = set()
    for doc in kuberay:
        for d in walk(doc):
            if d.get("name") in CREDENTIAL_VARS and ("value" in d or "valueFrom" in d):
                assert "value" not in d, f"{d['name']} given inline"
                ref = d["valueFrom"]["secretKeyRef"]
                referenced.add(ref["name"])
    assert referenced, "no S3 credentials wired through secretKeyRef"
    for secret in (d for d in kuberay if d.get("kind") == "Secret"):
        # Only a template: placeholder values, and a name that cannot overwrite the real Secret on apply.
        assert secret["metadata"]["name"] not in referenced
        values = {**secret.get("stringData", {}), **secret.get("data", {})}
        assert values and all(str(v).startswith("<") for v in values.values()), values


def test_no_credentials_in_any_cluster_file():
    for f in [*CLUSTER.glob("*.y*ml"), *CLUSTER.glob("kuberay/*"), *CLUSTER.glob("*.json"), *CLUSTER.glob("*.sh")]:
        text = f.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f  # an AWS access key id
        if f.suffix in (".yaml", ".yml", ".json"):
            # a mapping `aws_secret_access_key: <value>` may only hold a placeholder (the Secret template)
            for m in re.finditer(r"aws_secret_access_key\"?\s*:\s*(\S+)", text, re.IGNORECASE):
                assert m.group(1).startswith(('"<', "<")), f"{f.name}: {m.group(0)}"


# ---------------------------------------------------------------------------------------------- local cluster


def test_fake_multinode_config():
    from ray.autoscaler._private.util import validate_config

    cfg = load_yaml(CLUSTER / "fake-multinode.yaml")
    validate_config(cfg)  # the monitor validates it the same way
    provider = cfg["provider"]
    assert provider["type"] == "fake_multinode"
    # Without these the fake workers start but the autoscaler never counts them as up (see the file).
    assert provider["use_node_id_as_ip"] and provider["disable_node_updaters"]
    assert cfg["head_node_type"] == "ray.head.default"  # name hard-coded by the fake provider
    workers = worker_types(cfg)
    assert workers
    for name, t in workers.items():
        assert t.get("min_workers", 0) == 0 and t["max_workers"] > 0, name
        assert t["resources"].get("CPU", 0) >= 1
    assert 0 < cfg["idle_timeout_minutes"] <= 1


@pytest.mark.parametrize("script", ["local.sh", "s3_local.sh"])
def test_scripts_are_valid_bash(script):
    path = CLUSTER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    text = path.read_text()
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(path)], check=True)
    help_out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, check=True).stdout
    assert "stop" in help_out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
