"""Runs Helm actions (helm-sdkpy: the real Helm v4 engine) in a child process.

Helm's storage driver is read from the environment when the Go library loads, so the parent starts this script with
HELM_DRIVER=memory (the default Secret driver sends protobuf, which the JSON-only kube-emulator refuses). Releases
live in this process's memory: an install and the upgrades of the same release must go in one job.

stdin:  {"kubeconfig": PATH, "namespace": NS, "ops": [{"op": "install"|"upgrade"|"lint", "release": NAME,
         "chart": PATH, "values": {...}}, ...]}
stdout: one JSON list, one entry per op: {"ok": true, "manifest": ..., "notes": ...} or {"ok": false, "error": ...}
"""

import asyncio
import json
import os
import sys

import helm_sdkpy as helm


def main() -> None:
    if os.environ.get("HELM_DRIVER") != "memory":
        sys.exit("helm_runner: HELM_DRIVER=memory must be set by the parent process")
    job = json.load(sys.stdin)
    config = helm.Configuration(namespace=job["namespace"], kubeconfig=job["kubeconfig"])
    results = []
    for op in job["ops"]:
        try:
            if op["op"] == "lint":
                lint = asyncio.run(helm.Lint(config).run(op["chart"]))
                results.append({"ok": True, "lint": lint})
                continue
            action = helm.Install(config) if op["op"] == "install" else helm.Upgrade(config)
            kwargs = {"values": op.get("values") or None, "wait": False, "timeout": 60}
            release = asyncio.run(action.run(op["release"], op["chart"], **kwargs))
            results.append(
                {
                    "ok": True,
                    "manifest": release.get("manifest", ""),
                    "notes": (release.get("info") or {}).get("notes", ""),
                    "version": release.get("version"),
                }
            )
        except helm.HelmError as error:
            results.append({"ok": False, "error": str(error)})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
