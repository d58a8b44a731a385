"""Cluster definitions: launcher YAMLs pass Ray's own schema and checks, KubeRay
manifests carry what the operator requires, and neither exposes Ray to the internet.

Nothing here starts Ray or talks to a cloud.
"""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parents[1]
CLUSTERS = sorted((ROOT / "clusters").glob("*.yaml"))
CLOUD = {"aws": ROOT / "clusters/aws.yaml", "gcp": ROOT / "clusters/gcp.yaml"}
KUBERAY = ROOT / "clusters/kuberay"
ALL_FILES = sorted(p for p in (ROOT / "clusters").rglob("*") if p.is_file())
YAML_FILES = [p for p in ALL_FILES if p.suffix == ".yaml"]
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard + job API, Ray Client
PUBLIC = {"0.0.0.0/0", "::/0"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pinned_ray_version() -> str:
    """The ``ray[...]==X`` pin of pyproject.toml (it must match the installed Ray)."""
    match = re.search(
        r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert match, "pyproject.toml pins no ray version"
    return match.group(1)


# ---- launcher YAMLs (clusters/*.yaml) -------------------------------------------


def test_there_are_local_aws_and_gcp_clusters():
    assert {p.name for p in CLUSTERS} >= {"local.yaml", "aws.yaml", "gcp.yaml"}
    assert load(CLOUD["aws"])["provider"]["type"] == "aws"
    assert load(CLOUD["gcp"])["provider"]["type"] == "gcp"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_launcher_yaml_matches_rays_schema(path):
    schema = json.loads(
        (Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text()
    )
    jsonschema.validate(load(path), schema)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_the_checks_of_ray_up(path):
    """What `ray up` runs before it contacts the cloud: defaults, docker, bounds."""
    validate_config(prepare_config(load(path)))


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_head_keeps_the_dashboard_on_localhost(path):
    config = load(path)
    heads = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert len(heads) == 1
    assert "--dashboard-host=127.0.0.1" in heads[0]
    commands = json.dumps(config)
    assert "--dashboard-host=0.0.0.0" not in commands
    assert "--dashboard-host=::" not in commands


@pytest.mark.parametrize("cloud", sorted(CLOUD))
def test_worker_types_have_bounds_within_the_cluster(cloud):
    config = load(CLOUD[cloud])
    types = config["available_node_types"]
    limit = config["max_workers"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert set(workers) == {"cpu_decode", "gpu_inference", "gpu_train"}
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= limit, name
    assert sum(spec["min_workers"] for spec in workers.values()) <= limit
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("cloud", sorted(CLOUD))
def test_gpu_worker_types_declare_gpus_and_use_the_cuda_image(cloud):
    config = load(CLOUD[cloud])
    version = pinned_ray_version()
    for name, spec in config["available_node_types"].items():
        gpus = spec["resources"].get("GPU", 0)
        if name.startswith("gpu_"):
            assert gpus >= 1, name
            assert spec["resources"]["CPU"] >= 1, name
            image = spec["docker"]["worker_image"]
            assert image == f"rayproject/ray:{version}-py311-gpu", name
        else:
            assert gpus == 0, name
            assert "docker" not in spec, name  # the CPU image from docker.image
    assert config["docker"]["image"] == f"rayproject/ray:{version}-py311"


@pytest.mark.parametrize("cloud", sorted(CLOUD))
def test_every_node_installs_this_checkout(cloud):
    config = load(CLOUD[cloud])
    assert config["file_mounts"] == {"~/raydd": "."}
    assert ".gitignore" in config["rsync_filter"]  # .venv and demo/ stay home
    (install,) = config["setup_commands"]
    assert install.startswith("pip install") and "-e ~/raydd" in install
    assert "torch==2.14.1" in install and "torchvision==0.29.1" in install


def test_pinned_ray_is_the_installed_ray():
    assert pinned_ray_version() == ray.__version__


# ---- security, every file under clusters/ --------------------------------------

SECRETS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN"),  # PEM private keys and certificates
    re.compile(r"password\s*:", re.IGNORECASE),
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r'"private_key(_id)?"'),  # GCP service-account key JSON
]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_no_secrets(path):
    text = path.read_text()
    for pattern in SECRETS:
        assert not pattern.search(text), f"{path.name}: {pattern.pattern}"


@pytest.mark.parametrize("text", ["id: AKIAABCDEFGHIJKLMNOP", "password: x"])
def test_the_secret_patterns_catch_secrets(text):
    assert any(p.search(text) for p in SECRETS)


def exposed_ports(rule: dict) -> set[int]:
    """The Ray ports an AWS IpPermission or a GCP firewall rule opens to everyone."""
    ranges = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
    ranges |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
    ranges |= set(rule.get("sourceRanges", []))
    if not ranges & PUBLIC:
        return set()
    if "FromPort" in rule:  # AWS; -1 (or protocol -1) means every port
        if rule["FromPort"] == -1 or rule.get("IpProtocol") == "-1":
            return set(RAY_PORTS)
        return {p for p in RAY_PORTS if rule["FromPort"] <= p <= rule["ToPort"]}
    exposed = set()
    for allowed in rule.get("allowed", []):  # GCP
        if not allowed.get("ports"):
            return set(RAY_PORTS)
        for spec in allowed["ports"]:
            low, _, high = str(spec).partition("-")
            exposed |= {p for p in RAY_PORTS if int(low) <= p <= int(high or low)}
    return exposed


def firewall_rules(node):
    """Every AWS IpPermission and GCP firewall rule anywhere in a parsed document."""
    if isinstance(node, dict):
        yield from node.get("IpPermissions", [])
        if "sourceRanges" in node:
            yield node
        for value in node.values():
            yield from firewall_rules(value)
    elif isinstance(node, list):
        for value in node:
            yield from firewall_rules(value)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_no_rule_opens_ray_ports_to_the_internet(path):
    for doc in yaml.safe_load_all(path.read_text()):
        for rule in firewall_rules(doc):
            assert not exposed_ports(rule), f"{path.name}: {rule}"


def test_the_rule_check_catches_open_ports():
    world = {"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert exposed_ports({**world, "FromPort": 8265, "ToPort": 8265}) == {8265}
    assert exposed_ports({**world, "FromPort": -1, "ToPort": -1}) == RAY_PORTS
    assert exposed_ports({**world, "FromPort": 22, "ToPort": 22}) == set()
    gcp = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"ports": ["6000-7000"]}]}
    assert exposed_ports(gcp) == {6379}
    vpc = {"IpRanges": [{"CidrIp": "10.0.0.0/8"}], "FromPort": -1, "ToPort": -1}
    assert exposed_ports(vpc) == set()


def test_aws_adds_no_inbound_rules_to_rays_defaults():
    assert load(CLOUD["aws"])["provider"]["security_group"]["IpPermissions"] == []


KEY = re.compile(r"^\s*(- )?[\w~][\w.~/-]*:(\s|$)")
BLOCK = re.compile(r":\s*[|>][-+]?\s*(#.*)?$")


def uncommented_keys(text: str) -> list[str]:
    """Lines that set a key with neither a comment on them nor one right above."""
    missing, above, block_indent = [], "", None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (not line.strip() or indent > block_indent):
            continue  # inside a | or > block scalar: text, not keys
        block_indent = None
        if KEY.match(line) and "#" not in line and not above.startswith("#"):
            missing.append(line)
        if KEY.match(line) and BLOCK.search(line):
            block_indent = indent
        if line.strip():
            above = line.strip()
    return missing


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_key_is_explained(path):
    assert uncommented_keys(path.read_text()) == []


def test_the_comment_check_finds_bare_keys():
    assert uncommented_keys("# a\na: 1\nb: 2\nc: |\n  d: 3\n") == ["b: 2", "c: |"]


# ---- KubeRay --------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        if path.name == "runtime-env.yaml":  # a Ray runtime env, not a manifest
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{path.name}:{doc['kind']}"] = doc
    return docs


def test_kuberay_manifests_parse_and_are_named():
    docs = manifests()
    assert set(docs) == {
        "raycluster.yaml:RayCluster",
        "rayjob.yaml:RayJob",
        "serviceaccount.yaml:ServiceAccount",
    }
    for name, doc in docs.items():
        assert doc["metadata"]["name"], name
        expected = "v1" if doc["kind"] == "ServiceAccount" else "ray.io/v1"
        assert doc["apiVersion"] == expected, name
    assert not any(d["kind"] in ("Service", "Ingress") for d in docs.values())


def containers(group: dict) -> list[dict]:
    found = group["template"]["spec"]["containers"]
    assert found and all(c["image"] for c in found)
    return found


def check_cluster_spec(spec: dict) -> None:
    """What KubeRay requires of a RayCluster spec, plus raydd's own rules."""
    version = pinned_ray_version()
    assert spec["rayVersion"] == version
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    assert head["rayStartParams"]["num-cpus"] == "0"
    (ray_head,) = containers(head)
    assert ray_head["image"] == f"rayproject/ray:{version}-py311"
    assert {p["containerPort"] for p in ray_head["ports"]} == RAY_PORTS
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-inference", "gpu-train"}
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        (worker,) = containers(group)
        resources = worker["resources"]
        assert resources["requests"] == resources["limits"], name
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        suffix = "-gpu" if name.startswith("gpu-") else ""
        assert worker["image"] == f"rayproject/ray:{version}-py311{suffix}", name
        assert (gpus >= 1) == name.startswith("gpu-"), name


def test_raycluster_has_what_kuberay_requires():
    check_cluster_spec(manifests()["raycluster.yaml:RayCluster"]["spec"])


def test_rayjob_runs_distill_on_the_same_cluster():
    job = manifests()["rayjob.yaml:RayJob"]["spec"]
    assert job["entrypoint"].startswith("python jobs/distill.py --config ")
    assert "storage_uri=s3://YOUR-BUCKET/" in job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")
    assert env["pip"] == load(KUBERAY / "runtime-env.yaml")["pip"]
    check_cluster_spec(job["rayClusterSpec"])
    cluster = manifests()["raycluster.yaml:RayCluster"]["spec"]
    assert job["rayClusterSpec"] == cluster


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_runtime_env_installs_pyprojects_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {requirement_name(r) for r in project["dependencies"]} - {"ray"}
    pip = load(KUBERAY / "runtime-env.yaml")["pip"]
    assert {requirement_name(r) for r in pip} == wanted
    assert "torch==2.14.1" in pip and "torchvision==0.29.1" in pip
