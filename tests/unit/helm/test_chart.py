"""The Helm chart (helm/hpt), rendered and linted offline with helm-python-sdk (Helm's Go SDK in
a shared library; no helm binary, no API server), every manifest validated with
kubernetes-validate --strict against two Kubernetes versions, plus policy asserts.

Values files: helm/hpt/ci/*-values.yaml (chart-testing's convention). The monitoring CRDs
(ServiceMonitor, PodMonitor, PrometheusRule) have no schema in kubernetes-validate; the
PrometheusRule's rules are checked with ``promtool check rules`` and ``promtool test rules``.

``helm_python.Chart.render`` does not expose Helm's ``api_versions``/``kube_version`` options
although the library's C ABI takes them (its JSON options struct), so ``render`` below calls the
same native entry point with them; everything else uses the public API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from base64 import b64decode
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")
from helm_python import _native  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "hpt"
CI = CHART / "ci"
KUBE_VERSIONS = ("1.27.0", "1.34.0")
MONITORING_API = "monitoring.coreos.com/v1"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}


def values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI / f"{name}-values.yaml").read_text()) or {}


def render(vals: dict[str, Any] | None = None, *, api_versions: tuple[str, ...] = (),
           kube_version: str = KUBE_VERSIONS[0]) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    opts = {"name": "r", "namespace": "ml", "is_install": True,
            "kube_version": f"v{kube_version}", "api_versions": list(api_versions)}
    out = json.loads(_native.call_string("helm_render", chart._raw(),
                                         json.dumps(vals) if vals else None, json.dumps(opts)))
    return [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", [])
                if c["name"] == name)


CASES = {
    "default": ((), values("default")),
    "gpu": ((), values("gpu")),
    "ha": ((), values("ha")),
    "external-redis": ((), values("external-redis")),
    "monitoring": ((MONITORING_API,), values("monitoring")),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(vals, api_versions=apis) for name, (apis, vals) in CASES.items()}


# --- lint and validation --------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_strict_finds_nothing_above_info(case):
    apis, vals = CASES[case]
    if apis:  # lint cannot be told about the Prometheus Operator API: lint what it can render
        vals = {**vals, "monitoring": {**vals["monitoring"],
                                       **{k: {"enabled": False} for k in
                                          ("serviceMonitor", "podMonitor", "prometheusRule")}}}
    report = helm.lint(CHART, vals, strict=True, namespace="ml")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_manifest_validates_strictly_on_two_kubernetes_versions(case, rendered):
    kinds = set()
    for doc in rendered[case]:
        kinds.add(doc["kind"])
        if doc["kind"] in CRD_KINDS:
            continue
        for kube in KUBE_VERSIONS:
            kv.validate(doc, kube, strict=True)  # raises ValidationError naming the field
    if case == "monitoring":
        assert kinds >= CRD_KINDS


def test_every_object_carries_the_standard_labels(rendered):
    for docs in rendered.values():
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "hpt"
            assert labels["app.kubernetes.io/instance"] == "r"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["app.kubernetes.io/version"] == "0.1.0"
            assert labels["helm.sh/chart"] == "hpt-0.1.0"
            assert labels["app.kubernetes.io/component"]


def test_selectors_are_a_version_free_subset_of_the_pod_labels(rendered):
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] in WORKLOADS | {"PodDisruptionBudget"}:
                selector = doc["spec"]["selector"]["matchLabels"]
            elif doc["kind"] == "Service":
                selector = doc["spec"]["selector"]
            else:
                continue
            assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector
            if doc["kind"] in WORKLOADS:
                pod_labels = doc["spec"]["template"]["metadata"]["labels"]
                assert selector.items() <= pod_labels.items(), doc["metadata"]["name"]
            else:  # Services and PDBs select the pods of some workload
                pods = [w["spec"]["template"]["metadata"]["labels"] for w in docs
                        if w["kind"] in WORKLOADS]
                assert any(selector.items() <= p.items() for p in pods), doc["metadata"]["name"]


# --- policy ----------------------------------------------------------------------------------


def test_controller_is_restricted_and_probed_over_grpc_health(rendered):
    docs = rendered["default"]
    deploy = one(docs, "Deployment", "-controller")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = container(deploy, "controller")
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == 7471
    assert "--health-port=7471" in c["args"]
    # mTLS and both roles' tokens on by default; no --insecure
    assert {"--tls-client-ca=/etc/hpt/tls/ca.crt", "--token-file=/etc/hpt/auth/token",
            "--agent-token-file=/etc/hpt/auth/agent-token"} <= set(c["args"])
    assert "--insecure" not in c["args"]
    # elected even alone: a rollout's new pod waits until the old one hands over
    assert "--leader-lease=5" in c["args"]
    assert deploy["spec"]["replicas"] == 1 and by_kind(docs, "PodDisruptionBudget") == []


def test_ha_runs_two_elected_replicas_behind_a_pdb(rendered):
    docs = rendered["ha"]
    deploy = one(docs, "Deployment", "-controller")
    assert deploy["spec"]["replicas"] == 2
    assert "--leader-lease=5" in container(deploy, "controller")["args"]
    pdb = one(docs, "PodDisruptionBudget", "-controller")
    assert pdb["spec"]["minAvailable"] == 1
    affinity = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert affinity["preferredDuringSchedulingIgnoredDuringExecution"]


def test_bundled_redis_keeps_an_append_only_file_on_a_volume_behind_a_password(rendered):
    docs = rendered["default"]
    sts = one(docs, "StatefulSet", "-redis")
    args = container(sts, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    env = {e["name"]: e for e in container(one(docs, "Deployment", "-controller"),
                                           "controller")["env"]}
    assert env["HPT_REDIS_URL"]["value"] == (
        "redis://:$(REDIS_PASSWORD)@r-hpt-redis.ml.svc:6379/0")
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "r-hpt-redis"


def test_external_redis_uses_the_url_and_the_existing_secret(rendered):
    docs = rendered["external-redis"]
    assert by_kind(docs, "StatefulSet") == []
    env = {e["name"]: e for e in container(one(docs, "Deployment", "-controller"),
                                           "controller")["env"]}
    assert env["HPT_REDIS_URL"]["value"] == (
        "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/0")
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "hpt-redis-credentials", "key": "redis-password"}
    egress = one(docs, "NetworkPolicy", "-controller")["spec"]["egress"]
    assert {"ports": [{"port": 6380, "protocol": "TCP"}]} in egress


def test_agents_hold_snapshots_in_a_memory_backed_shm_sized_from_the_budget(rendered):
    for case, size in (("default", "10240Mi"), ("gpu", "69632Mi")):
        ds = one(rendered[case], "DaemonSet", "-agent")
        dshm = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
        assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": size}
        mounts = {m["name"]: m["mountPath"] for m in container(ds, "agent")["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm"


def test_gpu_agents_request_gpus_on_gpu_nodes_with_the_node_name_as_identity(rendered):
    ds = one(rendered["gpu"], "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    agent = container(ds, "agent")
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert agent["resources"]["limits"]["memory"] == "512Gi"
    assert "--slots=8" in agent["args"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["terminationGracePeriodSeconds"] == 120
    node_name = {"valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    for c in (agent, container(ds, "node-certificate")):
        assert {"name": "NODE_NAME", **node_name} in c["env"]
    assert "--name=$(NODE_NAME)" in agent["args"]
    assert "--name=$(NODE_NAME)" in container(ds, "node-certificate")["args"]
    cpu = container(one(rendered["default"], "DaemonSet", "-agent"), "agent")
    assert "nvidia.com/gpu" not in str(cpu["resources"])


def test_only_the_init_container_sees_the_ca_key(rendered):
    ds = one(rendered["default"], "DaemonSet", "-agent")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    keys = {name: [i["key"] for i in v["secret"].get("items", [])]
            for name, v in volumes.items() if "secret" in v}
    assert "tls.key" in keys["ca"] and keys["ca-public"] == ["ca.crt"]
    assert keys["auth"] == ["agent-token"]  # agents never hold the client token
    agent_mounts = {m["name"] for m in container(ds, "agent")["volumeMounts"]}
    init_mounts = {m["name"] for m in container(ds, "node-certificate")["volumeMounts"]}
    assert "ca" in init_mounts and "ca" not in agent_mounts


def test_no_kubernetes_api_access_is_granted(rendered):
    for docs in rendered.values():
        assert not [d for d in docs if d["kind"] in
                    {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}]
        for sa in by_kind(docs, "ServiceAccount"):
            assert sa["automountServiceAccountToken"] is False
        for w in docs:
            if w["kind"] in WORKLOADS:
                assert w["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_network_policies_let_agents_reach_the_controller_and_each_other_only(rendered):
    docs = rendered["default"]
    policies = {d["metadata"]["name"]: d["spec"] for d in by_kind(docs, "NetworkPolicy")}
    agent_sel = {"app.kubernetes.io/name": "hpt", "app.kubernetes.io/instance": "r",
                 "app.kubernetes.io/component": "agent"}
    controller = policies["r-hpt-controller"]
    assert controller["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == agent_sel
    assert controller["ingress"][0]["ports"] == [{"port": 7470, "protocol": "TCP"}]
    redis = policies["r-hpt-redis"]
    assert redis["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
        "app.kubernetes.io/component"] == "controller"
    assert redis["egress"] == []
    agent = policies["r-hpt-agent"]
    egress_to = [r.get("to", [{}])[0].get("podSelector", {}).get("matchLabels", {})
                 .get("app.kubernetes.io/component") for r in agent["egress"]]
    assert egress_to == ["agent", "controller", None]  # None: DNS (kube-dns in any namespace)
    assert agent["egress"][2]["ports"][0]["port"] == 53


def test_generated_credentials_are_random_and_separate_per_role(rendered):
    secrets = {d["metadata"]["name"]: d for d in by_kind(rendered["default"], "Secret")}
    auth = secrets["r-hpt-auth"]["data"]
    assert b64decode(auth["token"]) != b64decode(auth["agent-token"])
    assert len(b64decode(auth["token"])) >= 32
    again = {d["metadata"]["name"]: d for d in by_kind(render(), "Secret")}
    assert again["r-hpt-auth"]["data"]["token"] != auth["token"]
    server = secrets["r-hpt-controller-tls"]
    assert server["type"] == "kubernetes.io/tls"
    assert b64decode(server["data"]["ca.crt"]) == b64decode(secrets["r-hpt-ca"]["data"]["tls.crt"])


def test_dashboards_configmap_ships_monitor_dashboards_byte_for_byte(rendered):
    cm = one(rendered["monitoring"], "ConfigMap", "-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "hpt"}
    source = sorted((ROOT / "monitor" / "dashboards").glob("*.json"))
    assert source
    assert cm["data"] == {f"hpt-{p.name}": p.read_text() for p in source}


def test_monitors_carry_the_additional_labels_prometheus_selects_on(rendered):
    docs = rendered["monitoring"]
    for kind in CRD_KINDS:
        (doc,) = by_kind(docs, kind)
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    (pm,) = by_kind(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for case in ("default", "gpu", "ha", "external-redis"):
        assert not [d for d in rendered[case] if d["kind"] in CRD_KINDS | {"ConfigMap"}]


def test_alert_rules_pass_promtool_tests(rendered, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus; scripts/setup.sh installs it)")
    (rule,) = by_kind(rendered["monitoring"], "PrometheusRule")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    names = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"HptNodeLost", "HptJobHang", "HptStraggler", "HptCheckpointStalled",
            "HptGoodputLow"} <= names
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test_file = tmp_path / "alerts_test.yaml"
    test_file.write_text((Path(__file__).parent / "alerts_test.yaml").read_text()
                         .replace("  - RULES", f"  - {rules}"))
    result = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_an_alert_uses_is_exported(rendered):
    from hpt.monitor.metrics import METRICS

    (rule,) = by_kind(rendered["monitoring"], "PrometheusRule")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    import re

    used = set(re.findall(r"\bhpt_[a-z0-9_]+", exprs))
    known = {s for m in METRICS for s in m.series_names}
    assert used and used <= known, used - known


# --- bad values ------------------------------------------------------------------------------

BAD_VALUES = {
    "controller.replicas": {"controller": {"replicas": 0}},
    "unknown key": {"controller": {"replica": 2}},
    "redis.appendfsync": {"redis": {"appendfsync": "sometimes"}},
    "agents.gpusPerNode": {"agents": {"gpusPerNode": -1}},
    "redis.external.url": {"redis": {"enabled": False}},
    "goodputThreshold": {"monitoring": {"prometheusRule": {"goodputThreshold": 1.5}}},
    "image.pullPolicy": {"image": {"pullPolicy": "Sometimes"}},
    "external url with password": {"redis": {"enabled": False,
                                              "external": {"url": "redis://:pw@h:6379/0"}}},
    "shm budget": {"agents": {"shm": {"snapshotBudgetMiB": "8Gi"}}},
}


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(bad):
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(BAD_VALUES[bad])
    with pytest.raises(helm.HelmError):
        render(BAD_VALUES[bad])


def test_defaults_and_ci_values_pass_the_schema():
    chart = helm.Chart.load(CHART)
    for _apis, vals in CASES.values():
        chart.validate_schema(vals)


def test_monitoring_without_the_operator_api_fails_with_a_clear_message():
    with pytest.raises(helm.HelmRenderError, match="monitoring.coreos.com/v1"):
        render(values("monitoring"))


def test_leader_lease_must_be_shorter_than_the_agent_lease():
    bad = {"controller": {"leaderLeaseSeconds": 20, "agentLeaseSeconds": 15}}
    with pytest.raises(helm.HelmRenderError, match="leaderLeaseSeconds"):
        render(bad)


def test_dockerfile_installs_every_part_and_runs_as_the_charts_user(rendered):
    """No image builder here: check the Dockerfile against pyproject and the chart instead."""
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"].values()
    for folder in package_dirs:
        assert f"COPY {folder} ./{folder}" in dockerfile
    assert "ARG TORCH_VARIANT=cpu" in dockerfile and "whl/${TORCH_VARIANT}" in dockerfile
    assert "USER 10001:10001" in dockerfile
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for docs in rendered.values():
        for w in docs:
            if w["kind"] in WORKLOADS and not w["metadata"]["name"].endswith("-redis"):
                assert w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
                image = w["spec"]["template"]["spec"]["containers"][0]["image"]
                assert image == f"hpt:{chart['appVersion']}"


def test_packaged_chart_carries_the_dashboards_as_files_not_a_link(tmp_path):
    """files/dashboards is a symlink to monitor/dashboards (one source of truth); packaging
    must resolve it, or a chart pulled from a repository would ship without dashboards."""
    import tarfile

    archive = helm.Chart.load(CHART).save(tmp_path)
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for source in (ROOT / "monitor" / "dashboards").glob("*.json"):
            member = members[f"hpt/files/dashboards/{source.name}"]
            assert member.isfile()
            assert tar.extractfile(member).read() == source.read_bytes()
        assert not any(name.startswith("hpt/ci/") for name in members)  # .helmignore
