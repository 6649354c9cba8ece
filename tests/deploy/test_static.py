"""deploy/ checked by the real tools: systemd-analyze, hadolint, kubernetes-validate, haproxy, nginx.

Each check is run once on a deliberately broken copy too, so that a tool which stopped
checking (or a wrapper that swallows its verdict) cannot turn into a green test.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from prefork import config
from tests.deploy.conftest import DEPLOY, PREFORK, ROOT, load_yaml, module, render, run, tool

UNITS = ("prefork.socket", "prefork.service", "prefork@.service")
MANIFESTS = sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes still commonly run, and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.29.0", "latest")


def unit_settings(name: str) -> dict[str, str]:
    """Key=Value lines of a unit (the last one wins, as systemd reads single-valued keys)."""
    found = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";")):
            found[key.strip()] = value.strip()
    return found


# -- systemd -----------------------------------------------------------------------------------


def systemd_copy(tmp_path: Path) -> Path:
    """The units in tmp_path, with ExecStart/ExecReload pointing at this venv's prefork:
    systemd-analyze verify refuses a unit whose executable does not exist, and /opt/prefork
    (where deploy/README.md installs it) is not there on a test machine."""
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        if name.endswith(".service"):
            text = render(text, [(r"/opt/prefork/bin/prefork", PREFORK)])
        (units / name).write_text(text)
    return units


def verify(units: Path) -> str:
    """systemd-analyze verify on the units (the template as an instance); its whole output."""
    done = run([tool("systemd-analyze"), "verify", "--man=no", *(str(units / n) for n in
                                                                ("prefork.socket", "prefork.service", "prefork@a.service"))],
               timeout=60, cwd=units)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}".strip()


def test_systemd_units_verify_without_a_single_warning(tmp_path):
    # verify exits 0 on unknown keys and unparsable values (only warning): any output fails.
    assert verify(systemd_copy(tmp_path)) == "exit 0"


@pytest.mark.parametrize("unit, line, broken", [
    ("prefork.service", "KillMode=mixed", "KillMod=mixed"),
    ("prefork@.service", "Type=notify", "Type=notifyy"),
    ("prefork.socket", "ListenDatagram=9000", "ListenDatagram=9000\nAccept=maybe"),
])
def test_systemd_analyze_catches_a_broken_unit(tmp_path, unit, line, broken):
    units = systemd_copy(tmp_path)
    path = units / unit
    path.write_text(render(path.read_text(), [(f"^{re.escape(line)}$", broken)]))
    assert verify(units) != "exit 0"


def test_units_stop_the_master_only_and_wait_longer_than_graceful_timeout():
    graceful = config.Settings().graceful_timeout  # deploy/prefork.toml leaves the default
    for name in ("prefork.service", "prefork@.service"):
        unit = unit_settings(name)
        assert (unit["Type"], unit["KillMode"], unit["KillSignal"]) == ("notify", "mixed", "SIGTERM"), name
        # main: the old master hands MAINPID over on upgrade (see test_systemd.py)
        assert unit["NotifyAccess"] == "main", name
        assert float(unit["TimeoutStopSec"]) > graceful, name
        assert "prefork reload --pidfile" in unit["ExecReload"], name
        pidfile = shlex.split(unit["ExecStart"])[shlex.split(unit["ExecStart"]).index("--pidfile") + 1]
        assert pidfile.startswith(f"/run/{unit['RuntimeDirectory']}/") and pidfile in unit["ExecReload"], name
    assert "--bind systemd" in unit_settings("prefork.service")["ExecStart"]
    assert tomllib.loads((DEPLOY / "prefork.toml").read_text())["pidfile"] == "/run/prefork/prefork.pid"


# -- container ---------------------------------------------------------------------------------


def hadolint(path: Path) -> str:
    done = run([tool("hadolint"), "--no-color", str(path)], timeout=60)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}".strip()


def test_dockerfile_passes_hadolint_with_no_finding_at_all():
    # hadolint's default failure threshold is "info": even a style remark fails.
    assert hadolint(DEPLOY / "Dockerfile") == "exit 0"


def test_hadolint_catches_a_root_user(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(render((DEPLOY / "Dockerfile").read_text(), [(r"^USER .*$", "USER root")]))
    assert "DL3002" in hadolint(broken)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_docker_context_holds_what_the_dockerfile_copies():
    """The context is the repository root; deploy/Dockerfile.dockerignore lets in only what is listed."""
    kept = {line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
            if line.startswith("!")}
    copied = [args.split()[:-1] for name, args in dockerfile_instructions() if name == "COPY" and "--from" not in args]
    sources = {source.rstrip("/") for group in copied for source in group}
    assert sources and sources <= kept and all((ROOT / source).exists() for source in sources), (sources, kept)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(packages) | {"pyproject.toml", "README.md"} <= sources


def test_dockerfile_runs_as_a_numeric_non_root_user_with_sigterm_and_a_cli_healthcheck():
    instructions = dict(dockerfile_instructions())  # the last of each kind: the runtime stage
    assert re.fullmatch(r"\$\{UID\}:\$\{UID\}", instructions["USER"])
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(instructions["HEALTHCHECK"].split("CMD", 1)[1]) == ["prefork", "status"]
    assert "PREFORK_PIDFILE=/run/prefork/prefork.pid" in instructions["ENV"]


# -- Kubernetes --------------------------------------------------------------------------------


def k8s_validate(document: dict, version: str) -> None:
    kubernetes_validate = module("kubernetes_validate")
    kubernetes_validate.validate(document, kubernetes_validate.latest_version() if version == "latest" else version,
                                 strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_manifest_is_valid(name, version):
    documents = load_yaml(DEPLOY / "kubernetes" / name)
    assert documents
    for document in documents:
        k8s_validate(document, version)  # strict: an unknown field is an error


def test_kubernetes_validate_catches_an_unknown_field():
    kubernetes_validate = module("kubernetes_validate")
    deployment = k8s("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment, "latest")


def k8s(name: str) -> dict:
    [document] = load_yaml(DEPLOY / "kubernetes" / name)
    return document


def test_kubernetes_pieces_fit_together(tmp_path):
    assert MANIFESTS == ["configmap.yaml", "deployment.yaml", "hpa.yaml", "pdb.yaml", "service.yaml"]
    pod = k8s("deployment.yaml")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    settings_file = tmp_path / "prefork.toml"
    settings_file.write_text(k8s("configmap.yaml")["data"]["prefork.toml"])
    checked = run([PREFORK, "check-config", "-c", str(settings_file)])
    assert (checked.returncode, checked.stdout) == (0, "configuration OK\n"), checked.stderr
    settings = tomllib.loads(settings_file.read_text())
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert int(pre_stop[1]) + settings["graceful_timeout"] < pod["spec"]["terminationGracePeriodSeconds"]
    assert {(p["containerPort"], p["protocol"]) for p in container["ports"]} == {(9000, "TCP"), (9000, "UDP")}
    assert settings["bind"] == ["tcp://0.0.0.0:9000", "udp://0.0.0.0:9000"]
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in k8s("service.yaml")["spec"]["ports"]} == names
    labels = pod["metadata"]["labels"]
    for name in ("service.yaml", "pdb.yaml"):
        selector = k8s(name)["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= labels.items(), name
    assert k8s("hpa.yaml")["spec"]["scaleTargetRef"]["name"] == k8s("deployment.yaml")["metadata"]["name"]
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["spec"]["securityContext"]["runAsNonRoot"]
    assert "/run/prefork" in {m["mountPath"] for m in container["volumeMounts"]}  # the pidfile's directory


# -- HAProxy, nginx ----------------------------------------------------------------------------


def haproxy_check(path: Path) -> str:
    # -dW: zero-warning mode, a warning fails the check like an error
    done = run([tool("haproxy"), "-dW", "-c", "-f", str(path)], timeout=30)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_haproxy_config_is_valid():
    assert haproxy_check(DEPLOY / "haproxy" / "haproxy.cfg").startswith("exit 0\n")


def test_haproxy_check_catches_a_broken_config(tmp_path):
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(render((DEPLOY / "haproxy" / "haproxy.cfg").read_text(), [(r"balance leastconn", "balance fastest")]))
    assert not haproxy_check(broken).startswith("exit 0\n")


def nginx_test(tmp_path: Path, text: str) -> str:
    """nginx -t on *text* with its pid and log files moved into tmp_path (nginx -t opens the logs)."""
    path = tmp_path / "nginx.conf"
    path.write_text(render(text, [(r"^pid \S+;", f"pid {tmp_path}/nginx.pid;"),
                                  (r"^error_log \S+", f"error_log {tmp_path}/error.log"),
                                  (r"access_log \S+", f"access_log {tmp_path}/access.log")]))
    # -e: the log nginx writes before it has read the configuration. No -p: Debian's
    # modules-enabled loads the stream module relative to the default prefix.
    done = run([tool("nginx"), "-t", "-e", str(tmp_path / "startup.log"), "-c", str(path)], timeout=30)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_nginx_udp_stream_config_is_valid(tmp_path):
    assert nginx_test(tmp_path, (DEPLOY / "nginx" / "prefork-udp.conf").read_text()).startswith("exit 0\n")


def test_nginx_test_catches_a_broken_config(tmp_path):
    text = render((DEPLOY / "nginx" / "prefork-udp.conf").read_text(), [(r"proxy_responses 1;", "proxy_responses one;")])
    assert not nginx_test(tmp_path, text).startswith("exit 0\n")
