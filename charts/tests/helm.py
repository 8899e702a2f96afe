#!/usr/bin/env python3
"""The chart tests' Helm engine: Helm's own Go SDK, embedded by the PyPI package
helm-python-sdk (no helm binary). Called by operator/tests/chart.rs, one job per run;
prints one JSON document on stdout.

    helm.py lint     CHART NAMESPACE VALUES_JSON   -> {"messages": [...], "errors": [...]}
    helm.py render   CHART NAMESPACE VALUES_JSON   -> {"manifests": {path: yaml}} | {"error": msg}
    helm.py validate CHART VALUES_JSON             -> {"ok": true} | {"error": msg}
    helm.py crds     CHART                         -> {"crds": [{"filename", "data"}]}

Exit code 3 when helm-python-sdk is not installed (scripts/test installs it).
"""
import json
import sys

try:
    import helm_python as helm
except ImportError:
    sys.stderr.write(
        "helm.py: the PyPI package helm-python-sdk is not installed for %s "
        "(./scripts/test installs it into target/helm-venv)\n" % sys.executable
    )
    sys.exit(3)


def main(argv):
    job, chart = argv[1], argv[2]
    if job == "lint":
        namespace, values = argv[3], json.loads(argv[4])
        out = helm.lint(chart, values, strict=True, namespace=namespace, kube_version="v1.29.0")
    elif job == "render":
        namespace, values = argv[3], json.loads(argv[4])
        with helm.Chart.load(chart) as c:
            try:
                out = {"manifests": c.render(values, name="apiward", namespace=namespace, is_install=True)}
            except helm.HelmError as e:
                out = {"error": str(e)}
    elif job == "validate":
        with helm.Chart.load(chart) as c:
            try:
                c.validate_schema(json.loads(argv[3]))
                out = {"ok": True}
            except helm.HelmError as e:
                out = {"error": str(e)}
    elif job == "crds":
        with helm.Chart.load(chart) as c:
            out = {"crds": [{"filename": x.get("filename"), "data": x.get("data")} for x in c.crds]}
    else:
        sys.stderr.write("helm.py: unknown job %s\n" % job)
        return 2
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
