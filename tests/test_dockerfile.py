"""docker/Dockerfile, the chart's default image: it parses (Docker's own parser, via the `dockerfile`
package), copies every package the project installs, pins what setup.sh pins and runs as the chart's
user. There is no Docker engine on these machines, so the image itself is not built here."""

from __future__ import annotations

import re
import tomllib

import dockerfile
import yaml

from cluster.haproxy import BINARY_ENV, COMMAND
from tests.chart import CHART, ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions(cmd: str) -> list[tuple[str, ...]]:
    return [i.value for i in dockerfile.parse_file(str(DOCKERFILE)) if i.cmd == cmd]


def test_copies_every_installed_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {source for value in instructions("COPY") for source in value[:-1]}
    assert packages <= copied
    assert all((ROOT / source).exists() for source in copied)


def test_pins_what_setup_pins():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    args = dict(value[0].split("=", 1) for value in instructions("ARG"))
    assert f'"torch=={args["TORCH_VERSION"]}"' in setup
    assert f'"deepspeed=={args["DEEPSPEED_VERSION"]}"' in setup


def test_installs_the_ray_the_chart_declares():
    args = dict(value[0].split("=", 1) for value in instructions("ARG"))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert args["RAY_VERSION"] == values["rayVersion"]
    assert any('"ray[serve]==${RAY_VERSION}"' in value[0] for value in instructions("RUN"))


def test_runs_as_the_chart_user_and_is_the_chart_default():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    user, group = instructions("USER")[-1][0].split(":")
    assert (int(user), int(group)) == (values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"])
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert values["image"]["repository"] == "llm-cluster" and not values["image"]["tag"]  # tag: the appVersion
    assert chart["appVersion"] == project["project"]["version"]
    assert re.search(r"docker build -f docker/Dockerfile -t \S+/llm-cluster:" + re.escape(chart["appVersion"]), DOCKERFILE.read_text())


def test_every_node_runs_serves_haproxy_through_the_no_splice_command():
    env = dict(pair for value in instructions("ENV") for pair in zip(value[::2], value[1::2]))
    binary = env[BINARY_ENV]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"][COMMAND] == "cluster.haproxy:main" and binary == f"/usr/local/bin/{COMMAND}"
    assert any(f"test -x {binary}" in value[0] for value in instructions("RUN"))  # where pip put it in this image
