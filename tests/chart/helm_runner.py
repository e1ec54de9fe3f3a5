"""Runs Helm actions (helm-sdkpy: the real Helm v4 engine) in a child process.

Helm's storage driver is read from the environment when the Go library loads, so the parent starts this script with
HELM_DRIVER=memory (the default Secret driver sends protobuf, which the JSON-only kube-emulator refuses). Releases
live in this process's memory: an install and the upgrades of the same release must go in one job.

stdin:  {"kubeconfig": PATH, "namespace": NS, "ops": [{"op": "install"|"upgrade"|"uninstall"|"lint",
         "release": NAME, "chart": PATH, "values": {...}}, ...]}
stdout: one JSON list, one entry per op: {"ok": true, "manifest": ..., "notes": ...} or {"ok": false, "error": ...}

With `--interactive` the job comes as lines instead, so a test can act on the cluster between Helm actions of one
release: the first line is {"kubeconfig": PATH, "namespace": NS}, then one op per line, each answered by one result
line on stdout; end of input ends the process.
"""

import asyncio
import json
import os
import sys

import helm_sdkpy as helm


def run_op(config, op: dict) -> dict:
    try:
        if op["op"] == "lint":
            lint = asyncio.run(helm.Lint(config).run(op["chart"]))
            return {"ok": True, "lint": lint}
        if op["op"] == "uninstall":
            info = asyncio.run(helm.Uninstall(config).run(op["release"], wait=False, timeout=60))
            return {"ok": True, "info": info}
        action = helm.Install(config) if op["op"] == "install" else helm.Upgrade(config)
        kwargs = {"values": op.get("values") or None, "wait": False, "timeout": 60}
        release = asyncio.run(action.run(op["release"], op["chart"], **kwargs))
        return {
            "ok": True,
            "manifest": release.get("manifest", ""),
            "notes": (release.get("info") or {}).get("notes", ""),
            "version": release.get("version"),
        }
    except helm.HelmError as error:
        return {"ok": False, "error": str(error)}


def main() -> None:
    if os.environ.get("HELM_DRIVER") != "memory":
        sys.exit("helm_runner: HELM_DRIVER=memory must be set by the parent process")
    if "--interactive" in sys.argv[1:]:
        job = json.loads(sys.stdin.readline())
        config = helm.Configuration(namespace=job["namespace"], kubeconfig=job["kubeconfig"])
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(run_op(config, json.loads(line))), flush=True)
        return
    job = json.load(sys.stdin)
    config = helm.Configuration(namespace=job["namespace"], kubeconfig=job["kubeconfig"])
    json.dump([run_op(config, op) for op in job["ops"]], sys.stdout)


if __name__ == "__main__":
    main()
