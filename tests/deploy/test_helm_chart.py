"""The Helm chart (deploy/helm/tollgate), rendered by Helm's own engine.

helm_python binds the official Helm v4 Go SDK (no helm binary is packaged
for Debian): `lint` and `Chart.render` are what `helm lint` and
`helm template` run. Rendered manifests are validated against the
Kubernetes schemas (strict), and the rendered tollgate.toml must pass
`tollgate check` with the Secret's variables, and agree with the pod spec
(ports, data_dir, grace period). Run by scripts/deploy-check.sh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tollgate"
KUSTOMIZE_CONFIG = REPO / "deploy" / "kubernetes" / "base" / "tollgate.toml"
K8S_VERSION = "1.33.0"
VALIDATE = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "kubernetes-validate"


def render(
    values: dict[str, Any] | None = None, chart: Path = CHART, name: str = "agents"
) -> list[dict[str, Any]]:
    """`helm template <name> <chart> -n ai` as a list of objects."""
    with helm.Chart.load(chart) as c:
        out = c.render(values or {}, name=name, namespace="ai", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects rendered"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    r = subprocess.run(
        [str(VALIDATE), "--strict", "--quiet", "-k", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def sidecar(deploy: dict[str, Any]) -> dict[str, Any]:
    init = deploy["spec"]["template"]["spec"]["initContainers"]
    [tg] = [c for c in init if c["name"] == "tollgate"]
    return tg


def volume(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    [v] = [v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return v


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


def test_lints_clean_in_strict_mode() -> None:
    report = helm.lint(CHART, strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_render_is_valid_kubernetes(tmp_path: Path) -> None:
    docs = render()
    assert kinds(docs) == ["ConfigMap", "Deployment", "NetworkPolicy"]
    validate(docs, tmp_path)


def test_sidecar_is_native_and_wired_to_its_config_and_volumes() -> None:
    docs = render()
    deploy, cm = one(docs, "Deployment"), one(docs, "ConfigMap")
    tg = sidecar(deploy)
    assert tg["restartPolicy"] == "Always"
    assert tg["args"] == ["run", "--config", "/etc/tollgate/tollgate.toml", "--log-format", "json"]
    port_names = {p["name"] for p in tg["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tg[probe]["httpGet"]["port"] in port_names
    assert tg["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Not /readyz: a restart with a full spool would fail it and loop.
    assert tg["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert volume(deploy, "tollgate-config")["configMap"]["name"] == cm["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in tg["volumeMounts"]}
    assert mounts == {"tollgate-config": "/etc/tollgate", "tollgate-data": "/var/lib/tollgate"}
    assert "emptyDir" in volume(deploy, "tollgate-data")
    # The provider keys reach the sidecar only; the app gets its tenant key.
    app = deploy["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in app["env"] if "valueFrom" in e}
    assert refs == {"OPENAI_API_KEY": "agent-app-tenant-key", "ANTHROPIC_API_KEY": "agent-app-tenant-key"}
    tg_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in tg["env"] if "valueFrom" in e}
    assert tg_refs == {"tollgate-upstream-keys"}
    # The NetworkPolicy selects these pods.
    netpol = one(docs, "NetworkPolicy")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_rendered_config_passes_tollgate_check_and_matches_the_pod(tmp_path: Path) -> None:
    docs = render()
    deploy, cm = one(docs, "Deployment"), one(docs, "ConfigMap")
    text = cm["data"]["tollgate.toml"]
    # One example config: the chart's and the kustomize base's are the same file.
    assert text.strip() == (CHART / "files" / "tollgate.toml").read_text().strip()
    assert text.strip() == KUSTOMIZE_CONFIG.read_text().strip()

    tg = sidecar(deploy)
    config = tmp_path / "tollgate.toml"
    config.write_text(text)
    # Exactly the variables the pod gets from the Secret, set and non-empty.
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    env |= {e["name"]: "x" for e in tg["env"] if "valueFrom" in e}
    binary = os.environ.get("TOLLGATE_BIN", str(REPO / "target" / "debug" / "tollgate"))
    r = subprocess.run([binary, "check", "--config", str(config)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr

    parsed = tomllib.loads(text)["server"]
    ports = {p["name"]: p["containerPort"] for p in tg["ports"]}
    assert parsed["listen"] == f"127.0.0.1:{ports['tg-proxy']}"
    assert parsed["admin_listen"].endswith(f":{ports['tg-admin']}")
    assert parsed["data_dir"] == "/var/lib/tollgate"
    spec = deploy["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > seconds(parsed["shutdown_grace"])
    app_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert app_env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{ports['tg-proxy']}/openai/v1"
    assert app_env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{ports['tg-proxy']}/anthropic"


def test_values_override_config_ports_and_spool_volume(tmp_path: Path) -> None:
    config = '[server]\nlisten = "127.0.0.1:9000"\n'
    docs = render(
        {
            "config": config,
            "ports": {"proxy": 9000, "admin": 9001},
            "data": {"existingClaim": "tollgate-spool"},
            "image": {"repository": "registry.example/tollgate", "tag": "1.2.3"},
            "app": {"enabled": True, "name": "billing-agent", "replicas": 1},
        }
    )
    validate(docs, tmp_path)
    deploy = one(docs, "Deployment")
    assert deploy["metadata"]["name"] == "billing-agent"
    assert one(docs, "ConfigMap")["data"]["tollgate.toml"] == config
    tg = sidecar(deploy)
    assert tg["image"] == "registry.example/tollgate:1.2.3"
    assert {p["containerPort"] for p in tg["ports"]} == {9000, 9001}
    assert volume(deploy, "tollgate-data")["persistentVolumeClaim"] == {"claimName": "tollgate-spool"}
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    app_env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert app_env["OPENAI_BASE_URL"] == "http://127.0.0.1:9000/openai/v1"


def test_a_claimed_spool_is_refused_for_more_than_one_replica() -> None:
    # Two Tollgates on one data_dir would write the same segments and cursors.
    with pytest.raises(helm.HelmRenderError, match="data_dir of its own"):
        render({"data": {"existingClaim": "tollgate-spool"}})


def test_odd_but_legal_values_render_valid_yaml(tmp_path: Path) -> None:
    # Names that YAML would read as numbers or booleans, a config whose first
    # line is indented, a numeric tag, and the pod settings a cluster needs.
    config = "  # indented comment\n[server]\nlisten = \"127.0.0.1:8787\"\n"
    docs = render(
        {
            "config": config,
            "image": {"repository": "r/tollgate", "tag": 2},
            "secretEnv": {"secretName": "123", "keys": ["OPENAI_API_KEY"]},
            "rollOnConfigChange": True,
            "app": {
                "enabled": True,
                "name": "true",
                "podAnnotations": {"prometheus.io/scrape": "true"},
                "podLabels": {"team": "agents"},
                "serviceAccountName": "agent",
                "imagePullSecrets": [{"name": "regcred"}],
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
        name="123",
    )
    validate(docs, tmp_path)
    assert one(docs, "ConfigMap")["data"]["tollgate.toml"] == config
    deploy = one(docs, "Deployment")
    assert deploy["metadata"]["name"] == "true"
    assert deploy["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "true",
        "app.kubernetes.io/instance": "123",
    }
    pod = deploy["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "checksum/tollgate-config" in pod["metadata"]["annotations"]
    assert pod["metadata"]["labels"]["team"] == "agents"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    tg = sidecar(deploy)
    assert tg["image"] == "r/tollgate:2"
    assert tg["env"][1]["valueFrom"]["secretKeyRef"]["name"] == "123"


def test_existing_config_map_is_used_and_not_rendered() -> None:
    docs = render({"existingConfigMap": "my-tollgate", "rollOnConfigChange": True})
    assert "ConfigMap" not in kinds(docs)
    deploy = one(docs, "Deployment")
    assert volume(deploy, "tollgate-config")["configMap"]["name"] == "my-tollgate"
    # Nothing to hash: the chart does not see that ConfigMap's content.
    assert "annotations" not in deploy["spec"]["template"]["metadata"]


def test_roll_on_config_change_annotates_with_the_config_digest() -> None:
    assert "annotations" not in one(render(), "Deployment")["spec"]["template"]["metadata"]

    def digest(config: str) -> str:
        deploy = one(render({"rollOnConfigChange": True, "config": config}), "Deployment")
        return deploy["spec"]["template"]["metadata"]["annotations"]["checksum/tollgate-config"]

    a, b = digest("# a\n"), digest("# b\n")
    assert a == hashlib.sha256(b"# a\n").hexdigest()
    assert a != b


def test_without_the_app_only_the_config_map_is_rendered() -> None:
    assert kinds(render({"app": {"enabled": False}})) == ["ConfigMap"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"ports": {"proxy": "8787"}}, "/ports/proxy"),
        ({"prots": {"proxy": 1}}, "prots"),
        ({"secretEnv": {"secretName": "s", "keys": ["NOT-AN-ENV-NAME"]}}, "/secretEnv/keys/0"),
        ({"app": {"enabled": True, "baseUrls": {"OPENAI_BASE_URL": "openai/v1"}}}, "/app/baseUrls/OPENAI_BASE_URL"),
        ({"app": {"enabled": True, "name": "Agent_App"}}, "/app/name"),
        ({"app": {"enabled": True, "podLabels": {"app.kubernetes.io/name": "x"}}}, "/app/podLabels"),
        ({"data": {"sizeLimit": ""}}, "/data/sizeLimit"),
    ],
)
def test_bad_values_are_refused_by_the_schema(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)


def test_a_parent_chart_can_add_the_sidecar_to_its_own_deployment(tmp_path: Path) -> None:
    parent = tmp_path / "my-app"
    shutil.copytree(CHART, parent / "charts" / "tollgate")
    (parent / "templates").mkdir()
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: my-app\nversion: 1.0.0\n"
        "dependencies:\n  - name: tollgate\n    version: 0.1.0\n    condition: tollgate.enabled\n"
    )
    (parent / "values.yaml").write_text(
        "tollgate:\n  enabled: true\n  app:\n    enabled: false\n"
        "  image:\n    repository: ghcr.io/tollgate-dev/tollgate\n    tag: 0.1.1\n"
    )
    (parent / "templates" / "deployment.yaml").write_text(
        """\
{{- $tg := dict "Values" .Values.tollgate "Release" .Release "Chart" .Chart }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: my-app
spec:
  selector:
    matchLabels: {app: my-app}
  template:
    metadata:
      labels: {app: my-app}
    spec:
      initContainers:
        {{- include "tollgate.sidecar" $tg | nindent 8 }}
      containers:
        - name: app
          image: my-app:1
      volumes:
        {{- include "tollgate.volumes" $tg | nindent 8 }}
"""
    )
    docs = render(chart=parent)
    validate(docs, tmp_path)
    assert kinds(docs) == ["ConfigMap", "Deployment"]
    deploy = one(docs, "Deployment")
    tg = sidecar(deploy)
    assert tg["restartPolicy"] == "Always"
    assert tg["image"] == "ghcr.io/tollgate-dev/tollgate:0.1.1"
    # The parent's pod sets no securityContext: the sidecar's own is complete.
    assert "securityContext" not in deploy["spec"]["template"]["spec"]
    assert tg["securityContext"]["runAsUser"] == 65532
    assert tg["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert volume(deploy, "tollgate-config")["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
