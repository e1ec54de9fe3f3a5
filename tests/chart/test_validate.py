"""Rendered manifests validate against the Kubernetes OpenAPI schemas (kubernetes-validate, strict mode)."""

import kubernetes_validate
import pytest

from test_lint import CASES

# Kinds of CRDs the schemas do not carry: our own are checked by the CRD tests, cert-manager and Prometheus
# Operator kinds only exist in clusters that run them.
THIRD_PARTY = {"cert-manager.io/v1", "monitoring.coreos.com/v1"}
K8S_VERSION = "1.30.0"


@pytest.mark.parametrize("name", CASES)
def test_rendered_objects_validate(render, name):
    rendered = render(CASES[name])
    checked = 0
    for obj in rendered.objects:
        if obj["apiVersion"] in THIRD_PARTY:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}")
        checked += 1
    assert checked >= 5
