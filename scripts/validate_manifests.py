"""Validates rendered Kubernetes manifests offline (called by validate-manifests.sh).

Built-in kinds: kubernetes-validate's bundled OpenAPI schemas, strict.
keda.sh ScaledObject: the schema in deploy/kubernetes/schemas, plus its HPA
behavior block as an autoscaling/v2 HorizontalPodAutoscaler.
Then vlembed's own contract: probes on /ready and /health, a grace period
above preStop + drain delay + shutdown timeout, selectors that match, and
autoscalers that point at the Deployment.
"""

import argparse
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")
    print(f"FAIL {where}: {message}")


def kn(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def validate_builtin(path, doc, versions):
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{path} {kn(doc)} (k8s {v})", f"{'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{path} {kn(doc)} (k8s {v})", "no schema for this kind/apiVersion")


def validate_scaledobject(path, doc, schema, versions):
    for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
        fail(f"{path} {kn(doc)}", f"{'.'.join(map(str, e.path))}: {e.message}")
    spec = doc.get("spec", {})
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "keda-hpa-behavior"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": spec.get("maxReplicaCount", 1),
                "behavior": behavior,
            },
        }
        validate_builtin(f"{path} {kn(doc)} behavior", hpa, versions)
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if lo > hi:
        fail(f"{path} {kn(doc)}", f"minReplicaCount {lo} > maxReplicaCount {hi}")
    for t in spec.get("triggers", []):
        if t.get("type") == "prometheus" and "vlembed_queue" not in t.get("metadata", {}).get("query", ""):
            fail(f"{path} {kn(doc)}", "the Prometheus trigger does not query a vlembed queue metric")


def env_ms(container, name, default):
    for e in container.get("env", []):
        if e.get("name") == name:
            return int(e["value"])
    return default


def check_contract(path, docs):
    deployments = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Deployment"}
    if not deployments:
        fail(path, "no Deployment")
    for name, d in deployments.items():
        where = f"{path} Deployment/{name}"
        pod = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        sel = d["spec"]["selector"].get("matchLabels", {})
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            fail(where, f"selector {sel} does not match the pod labels {labels}")
        c = next((c for c in pod["containers"] if c["name"] == "vlembed"), None)
        if c is None:
            fail(where, "no container named vlembed")
            continue
        probes = {
            "readinessProbe": "/ready",
            "startupProbe": "/ready",
            "livenessProbe": "/health",
        }
        for probe, want in probes.items():
            got = c.get(probe, {}).get("httpGet", {}).get("path")
            if got != want:
                fail(where, f"{probe} checks {got!r}, expected {want!r}")
        pre = c.get("lifecycle", {}).get("preStop", {})
        pre_s = 0.0
        cmd = pre.get("exec", {}).get("command", [])
        if len(cmd) == 2 and cmd[0].endswith("sleep"):
            pre_s = float(cmd[1])
        elif "sleep" in pre:
            pre_s = float(pre["sleep"]["seconds"])
        else:
            fail(where, "no preStop delay: endpoints may still route to a draining pod")
        shutdown_ms = env_ms(c, "VLEMBED_SERVER__SHUTDOWN_TIMEOUT_MS", 30000)
        drain_ms = env_ms(c, "VLEMBED_SERVER__DRAIN_DELAY_MS", 0)
        need = pre_s + (drain_ms + shutdown_ms) / 1000.0
        grace = pod.get("terminationGracePeriodSeconds", 30)
        before = len(failures)
        if grace <= need:
            fail(where, f"terminationGracePeriodSeconds {grace} <= preStop {pre_s} s + drain {drain_ms} ms + shutdown {shutdown_ms} ms")
        for v in pod.get("volumes", []):
            if v["name"] == "hub-cache":
                break
        else:
            fail(where, "no hub-cache volume")
        if not c.get("resources", {}).get("requests"):
            fail(where, "no resource requests")
        if len(failures) == before:
            print(f"ok   {where}: grace {grace} s > preStop {pre_s:g} s + drain {drain_ms} ms + shutdown {shutdown_ms} ms")
    for d in docs:
        kind = d.get("kind")
        if kind in ("Service", "PodDisruptionBudget"):
            sel = d["spec"].get("selector", {})
            sel = sel.get("matchLabels", sel) if kind == "PodDisruptionBudget" else sel
            if not any(all(dep["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
                       for dep in deployments.values()) or not sel:
                fail(f"{path} {kn(d)}", f"selector {sel} matches no Deployment's pods")
        if kind in ("ScaledObject", "HorizontalPodAutoscaler"):
            target = d["spec"]["scaleTargetRef"]["name"]
            if target not in deployments:
                fail(f"{path} {kn(d)}", f"scales {target!r}, which is not a Deployment here")
    scalers = [d for d in docs if d.get("kind") in ("ScaledObject", "HorizontalPodAutoscaler")]
    if len(scalers) != 1:
        fail(path, f"{len(scalers)} autoscalers (expected exactly one: KEDA or HPA)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemas", required=True)
    ap.add_argument("--versions", required=True)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    versions = a.versions.split()
    with open(os.path.join(a.schemas, "scaledobject-keda.sh-v1alpha1.json")) as f:
        so_schema = json.load(f)
    count = 0
    for path in a.files:
        name = os.path.basename(path)
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            count += 1
            if doc.get("apiVersion", "").startswith("keda.sh/"):
                if doc.get("kind") != "ScaledObject":
                    fail(f"{name} {kn(doc)}", "no schema for this KEDA kind")
                else:
                    validate_scaledobject(name, doc, so_schema, versions)
            else:
                validate_builtin(name, doc, versions)
        check_contract(name, docs)
        print(f"ok   {name}: {len(docs)} objects validated (k8s {', '.join(versions)})" if not any(
            f.startswith(name) for f in failures) else f"FAIL {name}")
    if failures:
        print(f"{len(failures)} problem(s) in {count} objects", file=sys.stderr)
        return 1
    print(f"all {count} objects valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
