"""Real Helm (v4, the helm-python-sdk library) for the chart tests: render, lint, schema checks.

  chart.py render <chart> <values.yaml> [release] [namespace]  -> JSON [{"template", "object"}]
  chart.py lint <chart> <values.yaml>                          -> Helm's lint report (JSON)
  chart.py schema <chart> <values.yaml>                        -> {"ok": bool, "error": str}
"""
import json
import sys

import yaml
from helm_python import chart as helm


def values(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


def main():
    cmd, chart_dir, values_path = sys.argv[1:4]
    if cmd == "render":
        release = sys.argv[4] if len(sys.argv) > 4 else "celeriac"
        namespace = sys.argv[5] if len(sys.argv) > 5 else "dagster"
        rendered = helm.Chart.load(chart_dir).render(values(values_path), name=release, namespace=namespace,
                                                      is_install=True)
        out = []
        for template, text in sorted(rendered.items()):
            if template.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    out.append({"template": template, "object": doc})
        json.dump(out, sys.stdout)
    elif cmd == "lint":
        json.dump(helm.lint(chart_dir, values(values_path), strict=True), sys.stdout)
    elif cmd == "schema":
        try:
            helm.Chart.load(chart_dir).render(values(values_path), name="celeriac", namespace="dagster")
            json.dump({"ok": True, "error": ""}, sys.stdout)
        except Exception as e:  # the Helm error is the product here
            json.dump({"ok": False, "error": f"{type(e).__name__}: {e}"}, sys.stdout)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
