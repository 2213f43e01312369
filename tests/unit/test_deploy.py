"""deploy/: Prometheus and Alertmanager configs pass their own checkers; compose, Grafana
provisioning and Kubernetes manifests parse and are wired to each other and to the generated files.

No Docker or Kubernetes runs here: structure is checked, promtool/amtool validate what they can.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.alerts import alert_rules
from dashboards.config import GenerateConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "kubernetes"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(COMPOSE)
    return data


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_compose_prometheus_config_with_the_generated_rules_passes_promtool(tmp_path: Path) -> None:
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    # Point rule_files at the repository's generated rules, as the compose volume does.
    config["rule_files"] = [str(ROOT / "dashboards" / "generated" / "rules" / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = _run("promtool", "check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = len(alert_rules(GenerateConfig()))
    assert f"SUCCESS: {alerts} rules found" in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_kubernetes_scrape_config_passes_promtool() -> None:
    result = _run(
        "promtool", "check", "config", str(DEPLOY / "prometheus" / "kubernetes-scrape.yml")
    )
    output = result.stdout + result.stderr
    if "kubernetes_sd_configs not found" in output:
        pytest.skip("this promtool (Debian build) has no Kubernetes service discovery compiled in")
    assert result.returncode == 0, output


def test_prometheus_jobs_match_the_job_names_rules_and_dashboards_select() -> None:
    from dashboards.config import GenerateConfig

    config = GenerateConfig()
    for name in ("prometheus.yml", "kubernetes-scrape.yml"):
        jobs = {job["job_name"] for job in _yaml(DEPLOY / "prometheus" / name)["scrape_configs"]}
        assert {config.exporter_job, config.collector_job} <= jobs, name


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed")
def test_alertmanager_config_passes_amtool() -> None:
    result = _run("amtool", "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_inhibit_rules_name_real_alerts() -> None:
    from dashboards.alerts import alert_rules
    from dashboards.config import GenerateConfig

    names = {r.alert for r in alert_rules(GenerateConfig())}
    text = (DEPLOY / "alertmanager" / "alertmanager.yml").read_text()
    for rule in _yaml(DEPLOY / "alertmanager" / "alertmanager.yml")["inhibit_rules"]:
        for matcher in rule["source_matchers"]:
            assert matcher.split('"')[1] in names, matcher
    assert "HeadwatchTelemetryAbsent" in text


def test_compose_runs_the_whole_stack() -> None:
    services = _compose()["services"]
    assert {
        "kafka",
        "kafka-init",
        "exporter",
        "demo",
        "prometheus",
        "alertmanager",
        "grafana",
    } <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert "zookeeper" not in services


def test_compose_kafka_keeps_its_log_on_the_data_volume() -> None:
    kafka = _compose()["services"]["kafka"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in kafka["volumes"]}
    assert kafka["environment"]["KAFKA_LOG_DIRS"] == mounts["kafka-data"]


def test_compose_demo_writes_a_new_report_folder_on_every_restart() -> None:
    demo = _compose()["services"]["demo"]
    assert demo["restart"] == "unless-stopped"
    # a fixed --out is refused once the first run filled it; the default is timestamped
    assert "--out" not in demo["command"]
    assert demo["working_dir"] == "/tmp"  # the image's /app is not writable by its user


def test_compose_mounts_exist_in_the_repository() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).resolve().exists(), f"{name}: {source}"


def test_compose_prometheus_loads_the_generated_rules_and_grafana_the_dashboards() -> None:
    services = _compose()["services"]
    prometheus_mounts = {
        v.split(":")[0]: v.split(":")[1] for v in services["prometheus"]["volumes"]
    }
    assert prometheus_mounts["../../dashboards/generated/rules"] == "/etc/prometheus/rules"
    assert _yaml(DEPLOY / "prometheus" / "prometheus.yml")["rule_files"] == [
        "/etc/prometheus/rules/*.yml"
    ]
    grafana_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    provider = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "headwatch.yml")[
        "providers"
    ][0]
    assert grafana_mounts["../../dashboards/generated/grafana"] == provider["options"]["path"]
    assert services["grafana"]["image"].startswith("grafana/grafana:11.")


def test_compose_exporter_and_demo_use_the_documented_environment() -> None:
    services = _compose()["services"]
    exporter_env = services["exporter"]["environment"]
    assert exporter_env["HEADWATCH_EXPORTER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert exporter_env["HEADWATCH_EXPORTER_HTTP__PORT"] == "9464"
    assert all(k.startswith("HEADWATCH_COLLECTOR_") for k in services["demo"]["environment"])
    assert "/healthz" in " ".join(services["exporter"]["healthcheck"]["test"])
    assert (COMPOSE.parent / "Dockerfile").exists()


def test_grafana_datasource_points_at_compose_prometheus() -> None:
    sources = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "headwatch.yml")[
        "datasources"
    ]
    prometheus = next(s for s in sources if s["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090" and prometheus["isDefault"]


def _manifests() -> dict[str, dict[str, Any]]:
    kustomization = _yaml(K8S / "kustomization.yaml")
    docs = {}
    for resource in kustomization["resources"]:
        doc = _yaml(K8S / resource)
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], resource
        docs[doc["kind"]] = doc
    return docs


def test_exporter_deployment_has_probes_resources_and_env_config() -> None:
    deployment = _manifests()["Deployment"]
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    container = spec["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert container[probe]["httpGet"]["port"] == "metrics"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert all(name.startswith("HEADWATCH_EXPORTER_") for name in env)
    assert "HEADWATCH_EXPORTER_KAFKA__BOOTSTRAP_SERVERS" in env
    assert container["ports"][0] == {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
    assert spec["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_service_and_servicemonitor_select_the_exporter() -> None:
    docs = _manifests()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    monitor = docs["ServiceMonitor"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    # the job label becomes the Service's app.kubernetes.io/name: what rules select
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "headwatch-exporter"


def _k8s_env() -> dict[str, str]:
    container = _manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


@pytest.mark.parametrize(
    "env",
    [_compose()["services"]["exporter"]["environment"], _k8s_env()],
    ids=["compose", "kubernetes"],
)
def test_exporter_environment_is_read_by_exporter_settings(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.settings import ExporterSettings

    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = ExporterSettings()
    assert settings.kafka.bootstrap_servers == env["HEADWATCH_EXPORTER_KAFKA__BOOTSTRAP_SERVERS"]
    assert settings.http.port == 9464
    assert settings.http.host == "0.0.0.0"


def test_demo_environment_is_read_by_collector_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from collector.settings import CollectorSettings

    for name, value in _compose()["services"]["demo"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = CollectorSettings()
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.metrics_port == 9465
    assert settings.model_name == "headwatch-demo"


def test_grafana_datasource_uid_is_the_one_grafana_alert_rules_use() -> None:
    from dashboards.config import GenerateConfig

    sources = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "headwatch.yml")[
        "datasources"
    ]
    prometheus = next(s for s in sources if s["type"] == "prometheus")
    assert prometheus["uid"] == GenerateConfig().grafana_datasource_uid
