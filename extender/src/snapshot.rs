//! Which snapshot a pod needs: the `thaw.dev/snapshot` annotation, else the Knative revision
//! label mapped to a reference by a template.

use thaw_client::Reference;

use crate::wire::Pod;

/// The annotation naming a pod's snapshot (`<registry>/<repo>:<tag>` or `…@sha256:…`).
pub const SNAPSHOT_ANNOTATION: &str = "thaw.dev/snapshot";
/// Knative Serving's revision label.
pub const KNATIVE_REVISION_LABEL: &str = "serving.knative.dev/revision";
/// Knative Serving's service label.
pub const KNATIVE_SERVICE_LABEL: &str = "serving.knative.dev/service";
/// Knative Serving's configuration label.
pub const KNATIVE_CONFIGURATION_LABEL: &str = "serving.knative.dev/configuration";

/// The default `--knative-template`: one repository per Knative service in its namespace,
/// one tag per revision.
pub const DEFAULT_KNATIVE_TEMPLATE: &str = "{registry}/{namespace}/{service}:{revision}";

/// Maps pods to snapshot references.
#[derive(Debug, Clone)]
pub struct SnapshotRules {
    /// Registry host for references without one, and `{registry}` in the template.
    pub registry: String,
    /// Template for Knative pods without the annotation; `None` turns the mapping off.
    /// Placeholders: `{registry}`, `{namespace}` (`default` when unset), `{revision}`,
    /// `{service}` (the service label, else the configuration label), `{configuration}`.
    pub knative_template: Option<String>,
}

/// Why a pod has no snapshot reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoSnapshot {
    /// Neither the annotation nor a mappable Knative label.
    NotAThawPod,
    /// The annotation or the mapped template is not a valid reference.
    Invalid(String),
}

impl SnapshotRules {
    /// The snapshot `pod` needs.
    pub fn reference_for(&self, pod: &Pod) -> Result<Reference, NoSnapshot> {
        let text = if let Some(a) = pod.annotation(SNAPSHOT_ANNOTATION) {
            a.trim().to_owned()
        } else {
            let (Some(template), Some(revision)) =
                (&self.knative_template, pod.label(KNATIVE_REVISION_LABEL))
            else {
                return Err(NoSnapshot::NotAThawPod);
            };
            self.expand(template, pod, revision)?
        };
        Reference::parse_with_default(&text, Some(&self.registry))
            .map_err(|e| NoSnapshot::Invalid(e.to_string()))
    }

    fn expand(&self, template: &str, pod: &Pod, revision: &str) -> Result<String, NoSnapshot> {
        let configuration = pod.label(KNATIVE_CONFIGURATION_LABEL);
        let service = pod.label(KNATIVE_SERVICE_LABEL).or(configuration);
        let namespace = pod.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default");
        let mut out = template.to_owned();
        for (placeholder, value) in [
            ("{registry}", Some(self.registry.as_str())),
            ("{namespace}", Some(namespace)),
            ("{revision}", Some(revision)),
            ("{service}", service),
            ("{configuration}", configuration),
        ] {
            if out.contains(placeholder) {
                let Some(v) = value else {
                    return Err(NoSnapshot::Invalid(format!(
                        "the pod has no value for {placeholder} in {template:?}"
                    )));
                };
                out = out.replace(placeholder, v);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn rules(template: Option<&str>) -> SnapshotRules {
        SnapshotRules { registry: "reg.local:5000".into(), knative_template: template.map(str::to_owned) }
    }

    #[test]
    fn the_annotation_wins_then_the_knative_template() {
        let knative = serde_json::json!({"metadata": {"namespace": "team-a", "labels": {
            "serving.knative.dev/revision": "hello-00003", "serving.knative.dev/service": "hello",
            "serving.knative.dev/configuration": "hello-config"}}});
        let r = rules(Some(DEFAULT_KNATIVE_TEMPLATE));
        assert_eq!(
            r.reference_for(&pod(knative.clone())).unwrap().to_string(),
            "reg.local:5000/team-a/hello:hello-00003"
        );
        let custom = rules(Some("{registry}/functions/{configuration}-{revision}:latest"));
        assert_eq!(
            custom.reference_for(&pod(knative.clone())).unwrap().to_string(),
            "reg.local:5000/functions/hello-config-hello-00003:latest"
        );
        let mut annotated = knative.clone();
        annotated["metadata"]["annotations"] = serde_json::json!({SNAPSHOT_ANNOTATION: "other.host/fn/x@sha256:0000000000000000000000000000000000000000000000000000000000000000"});
        let a = r.reference_for(&pod(annotated)).unwrap();
        assert_eq!(a.registry(), "other.host");
        assert!(a.digest().is_some());
        // Without a host, the annotation resolves against the registry.
        let short =
            pod(serde_json::json!({"metadata": {"annotations": {SNAPSHOT_ANNOTATION: "fn/hello:v1"}}}));
        assert_eq!(r.reference_for(&short).unwrap().to_string(), "reg.local:5000/fn/hello:v1");
        // No template, or no label: not a thaw pod. A placeholder without a value: invalid.
        assert_eq!(rules(None).reference_for(&pod(knative.clone())), Err(NoSnapshot::NotAThawPod));
        assert_eq!(r.reference_for(&pod(serde_json::json!({}))), Err(NoSnapshot::NotAThawPod));
        let no_service =
            pod(serde_json::json!({"metadata": {"labels": {"serving.knative.dev/revision": "r-1"}}}));
        assert!(matches!(r.reference_for(&no_service), Err(NoSnapshot::Invalid(_))));
        let default_ns = rules(Some("{namespace}/{revision}"));
        assert_eq!(default_ns.reference_for(&no_service).unwrap().to_string(), "reg.local:5000/default/r-1");
    }
}
