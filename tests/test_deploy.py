"""deploy/: the Dockerfiles pass hadolint, the manifests validate against the Kubernetes schema
(kubernetes-validate ships the official JSON schemas, no network needed) and fit together, and the
container's command line serves the ConfigMap's run config when run directly (no Docker here)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml

from live_server import FEW_BUCKETS, REPO, LiveServer

DEPLOY = os.path.join(REPO, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
MANIFESTS = sorted(f for f in os.listdir(K8S) if f.endswith(".yaml"))
DOCKERFILES = ("Dockerfile", "Dockerfile.ascend")
KUBERNETES_VERSION = "1.30.0"  # a version current clusters (and ModelArts' CCE) run
TINY_CHATGLM3 = os.path.join(REPO, "tests", "fixtures", "chat", "chatglm3-e2e")


def tool(name):
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return path


def manifest(name) -> dict:
    with open(os.path.join(K8S, name), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def dockerfile_instructions(name) -> list:
    """(instruction, argument) pairs, continuation lines joined."""
    with open(os.path.join(DEPLOY, name), encoding="utf-8") as handle:
        text = handle.read().replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, argument = line.partition(" ")
            pairs.append((instruction.upper(), argument.strip()))
    return pairs


def instruction(name, which) -> str:
    return [argument for found, argument in dockerfile_instructions(name) if found == which][-1]


# ---------------------------------------------------------------------------------- linters
@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_pass_hadolint(name):
    result = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info",
                             os.path.join(DEPLOY, name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints():
    bad = "FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n"
    result = subprocess.run([tool("hadolint"), "--no-color", "-"], input=bad, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_kubernetes_schema(name):
    import kubernetes_validate
    kubernetes_validate.validate(manifest(name), KUBERNETES_VERSION, strict=True)


def test_schema_validation_rejects_mistakes():
    import kubernetes_validate
    deployment = manifest("deployment-cpu.yaml")
    typo = copy.deepcopy(deployment)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------------- the pieces fit
@pytest.mark.parametrize("variant", ["cpu", "ascend"])
def test_deployment_probes_volumes_and_resources(variant):
    deployment = manifest(f"deployment-{variant}.yaml")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in ports
    args = container["args"]
    assert ports[container["readinessProbe"]["httpGet"]["port"]] == int(args[args.index("--port") + 1])
    # the drain (SIGTERM) ends before Kubernetes kills the pod
    assert float(args[args.index("--drain-timeout") + 1]) < pod["spec"]["terminationGracePeriodSeconds"]
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == manifest("pvc.yaml")["metadata"]["name"]
    config_volume = volumes[mounts["/etc/mindglm"]]["configMap"]
    assert config_volume["name"] == manifest("configmap.yaml")["metadata"]["name"]
    assert config_volume["items"] == [{"key": f"serve-{variant}.yaml", "path": "serve.yaml"}]
    assert args[args.index("--config") + 1] == "/etc/mindglm/serve.yaml"
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000 and pod["spec"]["securityContext"]["runAsNonRoot"]
    resources = container["resources"]
    if variant == "ascend":
        assert resources["limits"]["huawei.com/Ascend910"] == resources["requests"]["huawei.com/Ascend910"] == 1
    else:
        assert not any(key.startswith("huawei.com/") for key in resources["limits"])


def test_service_selects_the_pods_on_the_named_port():
    service = manifest("service.yaml")
    pod = manifest("deployment-cpu.yaml")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {port["name"] for port in pod["spec"]["containers"][0]["ports"]}
    assert all(port["targetPort"] in ports for port in service["spec"]["ports"])


@pytest.mark.parametrize("variant", ["cpu", "ascend"])
def test_configmap_run_configs_are_valid(variant):
    """Each run config passes mindglm's own schema (the weights on the PVC are not here: a
    stand-in dir with the real layout — config.json and tokenizer — is passed as the checkpoint)."""
    from mindglm.yaml_config import build_run_config, parse_yaml
    raw = parse_yaml(manifest("configmap.yaml")["data"][f"serve-{variant}.yaml"], f"serve-{variant}.yaml")
    assert raw["checkpoint"] == raw["processor"]["tokenizer"] == "/models/chatglm3-6b"
    run = build_run_config(raw, f"serve-{variant}.yaml", "/", [("checkpoint", TINY_CHATGLM3),
                                                                ("processor.tokenizer", TINY_CHATGLM3),
                                                                ("model.model_config.seq_length", 8192)])
    assert run.family == "chatglm3"
    assert run.context["device_target"] == ("Ascend" if variant == "ascend" else "CPU")
    assert run.engine.max_num_seqs == raw["engine"]["max_num_seqs"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_run_as_uid_1000_and_serve_the_mounted_config(name):
    assert instruction(name, "USER").split(":")[0] == "1000"
    assert instruction(name, "WORKDIR") == "/opt/mindglm"
    cmd = json.loads(instruction(name, "CMD"))
    variant = "ascend" if name.endswith("ascend") else "cpu"
    container = manifest(f"deployment-{variant}.yaml")["spec"]["template"]["spec"]["containers"][0]
    entrypoint = json.loads(instruction(name, "ENTRYPOINT")) if variant == "ascend" else []
    # the Deployment runs the image's own command, with extra options after it
    full = container["command"] + container["args"]
    assert full[:len(entrypoint) + len(cmd)] == entrypoint + cmd
    # everything the command needs is copied into the image
    copied = [argument.split()[0] for found, argument in dockerfile_instructions(name) if found == "COPY"]
    assert {"mindglm", "tools", "configs", "setup.py"} <= set(copied)


def test_ascend_entrypoint_runs_its_command():
    result = subprocess.run([os.path.join(DEPLOY, "ascend-entrypoint.sh"), sys.executable, "-c", "print('ran')"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ran", result.stderr


def test_the_containers_command_line_serves_when_run_directly(tmp_path):
    """The CPU Deployment's command + args, run here as the container would run them (the
    ConfigMap's serve.yaml at its mount path's stand-in, the tiny model as the PVC's weights,
    127.0.0.1 instead of 0.0.0.0), answers /health, /v1/models and a chat completion, and drains."""
    config = tmp_path / "serve.yaml"
    config.write_text(manifest("configmap.yaml")["data"]["serve-cpu.yaml"], encoding="utf-8")
    container = manifest("deployment-cpu.yaml")["spec"]["template"]["spec"]["containers"][0]
    command = [sys.executable if part == "python" else part for part in container["command"]]
    args = [str(config) if part == "/etc/mindglm/serve.yaml" else part for part in container["args"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    port_at = args.index("--port")
    del args[port_at:port_at + 2]  # LiveServer picks a free port
    args += ["--set", f"checkpoint={TINY_CHATGLM3}", "--set", f"processor.tokenizer={TINY_CHATGLM3}",
             "--set", "engine.max_model_len=null",  # the tiny model's context is 512
             # one cache row and one prefill bucket: fewer graphs to warm up (the reply does not depend on them)
             "--set", "engine.max_num_seqs=1", *FEW_BUCKETS]
    server = LiveServer(args, str(tmp_path / "serve.log"), command=command).wait_healthy()
    try:
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "chatglm3-6b"
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "chatglm3-6b", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    finally:
        assert server.stop() == 0, server.log()
