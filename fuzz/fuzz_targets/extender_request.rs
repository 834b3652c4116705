//! kube-scheduler extender requests (`ExtenderArgs`, the body of `/filter` and
//! `/prioritize`), parsed the way the extender's private `parse_args` does
//! (`serde_json::from_slice::<ExtenderArgs>`), then read the way its handlers read them.
//!
//! Properties of an accepted body:
//! - `candidates()` is `NodeNames` when sent, else one `metadata.name` per item of
//!   `Nodes.items` (never more names than items);
//! - the `/filter` answer built from it serializes, and reads back with the same
//!   `NodeNames` and (when they hold no floating-point numbers) the same `Nodes`;
//! - the pod's snapshot reference (annotation, else the default Knative template), when
//!   there is one, has a valid repository and tag and survives `Display` → `Reference::parse`;
//!   without a template, a pod without the annotation is not a thaw pod.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use thaw_client::Reference;
use thaw_extender::snapshot::{NoSnapshot, SnapshotRules, DEFAULT_KNATIVE_TEMPLATE, SNAPSHOT_ANNOTATION};
use thaw_extender::wire::{ExtenderArgs, ExtenderFilterResult};
use thaw_schema::names::{is_valid_repository_name, is_valid_tag};

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(args) = serde_json::from_slice::<ExtenderArgs>(data) else { return };

    let candidates = args.candidates();
    match (&args.node_names, args.nodes.as_ref().and_then(|n| n.get("items")).and_then(Value::as_array)) {
        (Some(names), _) => assert_eq!(&candidates, names),
        (None, Some(items)) => assert!(candidates.len() <= items.len()),
        (None, None) => assert!(candidates.is_empty()),
    }

    // What `/filter` answers: the same nodes back, nothing filtered.
    let result = ExtenderFilterResult::keep_all(args.clone());
    let text = serde_json::to_vec(&result).expect("the filter answer serializes");
    let back: ExtenderFilterResult = serde_json::from_slice(&text).expect("the filter answer reads back");
    assert_eq!(back.node_names, result.node_names);
    if !result.nodes.as_ref().is_some_and(has_float) {
        assert_eq!(back.nodes, result.nodes);
    }

    let Some(pod) = &args.pod else { return };
    let _ = pod.display_name();
    let rules = SnapshotRules {
        registry: "registry.example:5000".into(),
        knative_template: Some(DEFAULT_KNATIVE_TEMPLATE.into()),
    };
    if let Ok(r) = rules.reference_for(pod) {
        assert!(is_valid_repository_name(r.repository()), "{r}");
        if let Some(t) = r.tag() {
            assert!(is_valid_tag(t), "{r}");
        }
        let text = r.to_string();
        let again = Reference::parse(&text).unwrap_or_else(|e| panic!("{text:?} does not parse back: {e}"));
        assert_eq!(again, r, "{text:?}");
    }
    let plain = SnapshotRules { registry: "registry.example:5000".into(), knative_template: None };
    if pod.annotation(SNAPSHOT_ANNOTATION).is_none() {
        assert_eq!(plain.reference_for(pod), Err(NoSnapshot::NotAThawPod));
    }
});
