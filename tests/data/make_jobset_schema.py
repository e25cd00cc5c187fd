"""Make jobset-v1alpha2.schema.json (beside this file) from JobSet's CRD, for test_launcher_k8s:

    python tests/data/make_jobset_schema.py jobset.x-k8s.io_jobsets.yaml > tests/data/jobset-v1alpha2.schema.json

The CRD is config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml of kubernetes-sigs/jobset (tag v0.9.1). Kept: its
openAPIV3Schema for v1alpha2, less descriptions, with every embedded Kubernetes type (a Job template, a claim
template) replaced by a $ref to kubernetes-validate's definitions of it (4 KB instead of 800), and unknown fields
refused, as ``kubectl apply`` refuses them (server-side field validation).
"""
from __future__ import annotations

import json
import sys
from typing import Any

import yaml

DEFINITIONS = "/api/_definitions.json#/$defs/"
REFS = {("spec", "replicatedJobs", "template"): "io.k8s.api.batch.v1.JobTemplateSpec",
        ("spec", "volumeClaimPolicies", "templates"): "io.k8s.api.core.v1.PersistentVolumeClaim"}


def walk(node: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k != "description" and not k.startswith("x-kubernetes")}
    if "properties" in out:
        props = {}
        for name, sub in out["properties"].items():
            key = tuple(p for p in (*path, name) if p != "items")
            if key in REFS:
                ref = {"$ref": DEFINITIONS + REFS[key]}
                props[name] = {"type": "array", "items": ref} if sub.get("type") == "array" else ref
            else:
                props[name] = walk(sub, (*path, name))
        out["properties"] = props
        out.setdefault("additionalProperties", False)
    if "items" in out:
        out["items"] = walk(out["items"], (*path, "items"))
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = walk(out["additionalProperties"], path)
    return out


def main(crd_path: str) -> None:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    schema = walk(version["schema"]["openAPIV3Schema"], ())
    schema["properties"].update(metadata={"$ref": DEFINITIONS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                                status={"type": "object"}, apiVersion={"const": "jobset.x-k8s.io/v1alpha2"},
                                kind={"const": "JobSet"})
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://kubernetes.io/api/jobset/jobset.x-k8s.io/v1alpha2"  # beside kubernetes-validate's
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
