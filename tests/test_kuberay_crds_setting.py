"""Where the chart and Kubernetes tests find the KubeRay CRDs: one setting, $LLM_CLUSTER_KUBERAY_CRDS, by default
the shared folder beside the checkout; without the files those tests skip and say how to get them."""

from __future__ import annotations

import pytest

from tests import chart


def test_the_setting_and_its_default():
    assert chart.crds_folder({}) == (chart.ROOT.parent / "shared" / "kuberay-crds").resolve()
    assert chart.crds_folder({chart.CRDS_SETTING: "/opt/kuberay/crds"}) == chart.Path("/opt/kuberay/crds")
    assert chart.crds_folder({chart.CRDS_SETTING: "crds"}) == chart.ROOT / "crds"  # relative to the repository's root


def test_missing_crds_skip_with_the_setting_and_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(chart, "CRDS", tmp_path)
    with pytest.raises(pytest.skip.Exception) as skipped:
        chart.crd_schemas()
    message = str(skipped.value)
    assert f"KubeRay CRD ray.io_rayservices.yaml not found in {tmp_path}: set LLM_CLUSTER_KUBERAY_CRDS" in message
    assert "from KubeRay v1.7.0 (ray-operator/config/crd/bases/ of the ray-project/kuberay repository at tag v1.7.0)" in message
