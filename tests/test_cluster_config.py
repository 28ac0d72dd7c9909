"""cluster.yaml is a valid Ray cluster-launcher config whose node types match what our jobs ask for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_own_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)  # merges the AWS defaults, as `ray up` does
    validate_config(prepared)  # jsonschema check of ray-schema.json plus Ray's own consistency checks
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_nodes_carry_the_model_resource_and_cpu_nodes_the_decode_resource(cluster):
    from jobs.caption import CaptionConfig

    types = cluster["available_node_types"]
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6", "g6e", "p4d", "p5"}]
    cpu = [t for t in types.values() if "decode" in t.get("resources", {})]
    assert gpu and all(t["resources"].get("model", 0) >= 1 for t in gpu)
    assert cpu and all(t["node_config"]["InstanceType"].startswith(("c", "m")) for t in cpu)
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "decode" not in head["resources"] and "model" not in head["resources"]
    # The caption job's placement flags name exactly these resources.
    cfg = CaptionConfig(input="s3://b/in/", output="s3://b/out/", decode_resource="decode", model_resource="model")
    assert cfg.decode_resource in cpu[0]["resources"] and cfg.model_resource in gpu[0]["resources"]


def test_every_node_installs_the_project_and_gpu_nodes_the_gpu_extra(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "torch==2.14.1" in setup and "pip install -q -e ." in setup
    assert any('.[gpu]' in c and "nvidia-smi" in c for c in cluster["worker_setup_commands"])
    assert any("--dashboard-port=8265" in c for c in cluster["head_start_ray_commands"])


def test_the_schema_check_rejects_a_misspelt_field(cluster):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = {**cluster, "max_worker": 3}  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
