"""Cluster-launcher YAMLs validate against the schema that ships inside Ray."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTERS = sorted((Path(__file__).parents[1] / "clusters").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_launcher_yaml_matches_rays_schema(path):
    schema = json.loads(
        (Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text()
    )
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    for command in config.get("head_start_ray_commands", []):
        if "--head" in command:  # the dashboard must not listen on every interface
            assert "--dashboard-host=127.0.0.1" in command


def test_there_is_a_cluster_yaml():
    assert CLUSTERS
