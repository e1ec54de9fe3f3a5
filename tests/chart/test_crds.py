"""The chart ships the generated CRDs unchanged."""

from conftest import CHART, ROOT


def test_chart_crds_are_byte_identical_to_the_generated_ones():
    generated = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    shipped = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert generated, "crds/ is empty"
    assert set(shipped) == set(generated), "charts/gitops-reverser/crds/ and crds/ hold different files"
    for name, content in generated.items():
        assert shipped[name] == content, f"{name} differs: cp crds/*.yaml charts/gitops-reverser/crds/"
