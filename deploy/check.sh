#!/bin/sh
# Checks deploy/ without a cluster, and against one when kubectl can reach it.
#
# Offline, `kubectl apply --dry-run=client` cannot run: even a client dry run asks the API
# server for its resource list (discovery) and fails with "connection refused". What works
# offline, and is run here:
#   1. `kubectl label --local -f deploy/ ... -o name`: kubectl parses every manifest, each
#      object's apiVersion/kind/name, without a server;
#   2. structural checks of what thaw relies on (python3 + PyYAML), and that the
#      scheduler ConfigMap carries exactly deploy/scheduler/scheduler-config.yaml.
# With a reachable cluster (or THAW_CHECK_CLUSTER=1), it also runs
#   kubectl apply --dry-run=client -f deploy/   and   --dry-run=server.
# scripts/test.sh runs it against a throwaway control plane (THAW_CHECK_CLUSTER=ephemeral):
#   target/debug/control-plane -- bash deploy/check.sh
# The CRD's drift from the Rust type is checked by `cargo test -p thaw-schema --lib crd`.
set -eu
cd "$(dirname "$0")"

echo "== kubectl parses every manifest (offline)"
kubectl label --local -f . -o name thaw.dev/checked=true
kubectl label --local -f scheduler/ -o name thaw.dev/checked=true

echo "== structure"
python3 - <<'PY'
import sys, yaml, glob
docs = {}
for f in sorted(glob.glob("*.yaml")):
    for d in yaml.safe_load_all(open(f)):
        if d:
            docs[(d["kind"], d["metadata"]["name"])] = d
def need(cond, what):
    if not cond:
        sys.exit("deploy/: " + what)
crd = docs[("CustomResourceDefinition", "nodesnapshotcaches.thaw.dev")]
need(crd["spec"]["scope"] == "Cluster", "the CRD must be cluster-scoped")
ds = docs[("DaemonSet", "thaw-node-cache")]["spec"]["template"]["spec"]
c = ds["containers"][0]
need(any(e["name"] == "NODE_NAME" and e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" for e in c["env"]),
     "node-cache must take NODE_NAME from spec.nodeName")
need("--node-name=$(NODE_NAME)" in c["args"], "node-cache must pass --node-name=$(NODE_NAME)")
need(any("hostPath" in v for v in ds["volumes"]), "node-cache cache dir must be a hostPath")
rules = docs[("ClusterRole", "thaw-node-cache")]["rules"]
need(any(r["resources"] == ["nodesnapshotcaches"] and set(r["verbs"]) == {"get", "create", "patch"} for r in rules),
     "node-cache RBAC: get/create/patch on nodesnapshotcaches")
need(any(r["resources"] == ["nodesnapshotcaches/status"] for r in rules), "node-cache RBAC: status")
ext = docs[("ClusterRole", "thaw-extender")]["rules"]
need(any({"list", "watch"} <= set(r["verbs"]) for r in ext), "extender RBAC: list/watch")
reg = docs[("Deployment", "thaw-registry")]["spec"]["template"]["spec"]["containers"][0]
need(any("secretRef" in e for e in reg.get("envFrom", [])), "registry S3 settings come from a Secret")
cm = docs[("ConfigMap", "thaw-scheduler-config")]["data"]["scheduler-config.yaml"]
cfg = yaml.safe_load(cm)
need(cfg == yaml.safe_load(open("scheduler/scheduler-config.yaml")),
     "scheduler-config.yaml's ConfigMap differs from scheduler/scheduler-config.yaml")
need(cfg["kind"] == "KubeSchedulerConfiguration" and cfg["percentageOfNodesToScore"] == 100, "scheduler config")
e = cfg["extenders"][0]
need(e["prioritizeVerb"] == "prioritize" and e["nodeCacheCapable"] is True and e["ignorable"] is True
     and e["httpTimeout"] and "filterVerb" not in e, "extender registration")
print("ok:", len(docs), "objects")
PY

case "${THAW_CHECK_CLUSTER:-}" in
ephemeral)
    # A throwaway API server (integration's control-plane runner, as scripts/test.sh runs
    # this): the namespace and the CRD are created for real, so the server can check every
    # namespaced object and everything that names the CRD's kind; then every manifest is
    # dry-run on the server (admission, schema validation, RBAC escalation checks included).
    echo "== against a throwaway API server ($(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])'))"
    kubectl apply -f 00-namespace.yaml -f crd.yaml
    kubectl wait --for=condition=Established crd/nodesnapshotcaches.thaw.dev --timeout=60s
    kubectl apply --dry-run=client -f .
    kubectl apply --dry-run=server -f .
    ;;
*)
    if [ "${THAW_CHECK_CLUSTER:-}" = 1 ] || kubectl version --request-timeout=3s >/dev/null 2>&1; then
        echo "== against the cluster"
        kubectl apply --dry-run=client -f .
        if kubectl get namespace thaw-system >/dev/null 2>&1 &&
            kubectl get crd nodesnapshotcaches.thaw.dev >/dev/null 2>&1; then
            kubectl apply --dry-run=server -f .
        else
            # Namespaced objects cannot be dry-run before their namespace exists.
            echo "== thaw-system or the CRD not installed yet: server dry run of those two only"
            kubectl apply --dry-run=server -f 00-namespace.yaml -f crd.yaml
        fi
    else
        echo "== no cluster reachable: skipped kubectl apply --dry-run=client (needs discovery)"
    fi
    ;;
esac
