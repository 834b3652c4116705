//! The node directory (`/v2/_thaw/nodes[/<node>]`, docs/API.md): where node caches publish
//! what they hold when there is no Kubernetes API to publish it to. Registry-wide, not
//! scoped to a repository. Node names arrive validated by `routes`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use thaw_schema::dto::MAX_NODE_RECORD_LEN;
use thaw_schema::holdings::{NodeDirectory, NodeHoldings, MAX_SNAPSHOTS_PER_NODE};
use thaw_schema::ErrorCode;

use super::{check_declared_length, read_body, AppState, Request};
use crate::error::{ApiError, ApiResult};

fn unknown(node: &str) -> ApiError {
    ApiError::new(ErrorCode::NameUnknown, format!("node {node:?} has published no holdings"))
        .with_detail(serde_json::json!({ "node": node }))
}

pub(super) async fn put(state: &Arc<AppState>, node: &str, req: Request) -> ApiResult<Response> {
    const WHAT: &str = "holdings record";
    check_declared_length(&req.headers, MAX_NODE_RECORD_LEN, WHAT)?;
    let body = read_body(req.body, MAX_NODE_RECORD_LEN, WHAT).await?;
    let holdings: NodeHoldings = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(ErrorCode::Unsupported, format!("{WHAT}: malformed JSON body: {e}"))
            .with_status(StatusCode::BAD_REQUEST)
    })?;
    if holdings.node != node {
        return Err(ApiError::new(
            ErrorCode::NameInvalid,
            format!("the record is for node {:?} but was sent to {node:?}", holdings.node),
        )
        .with_detail(serde_json::json!({ "node": node, "record": holdings.node })));
    }
    if holdings.snapshots.len() > MAX_SNAPSHOTS_PER_NODE {
        return Err(ApiError::new(
            ErrorCode::SizeInvalid,
            format!(
                "the record lists {} snapshots; at most {MAX_SNAPSHOTS_PER_NODE} are allowed",
                holdings.snapshots.len()
            ),
        ));
    }
    state.store.put_node(&holdings).await?;
    tracing::debug!(node, snapshots = holdings.snapshots.len(), "node holdings stored");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn get(state: &Arc<AppState>, node: &str) -> ApiResult<Response> {
    let holdings = state.store.get_node(node).await?.ok_or_else(|| unknown(node))?;
    Ok(axum::Json(holdings).into_response())
}

pub(super) async fn delete(state: &Arc<AppState>, node: &str) -> ApiResult<Response> {
    if !state.store.delete_node(node).await? {
        return Err(unknown(node));
    }
    tracing::debug!(node, "node holdings deleted");
    Ok(StatusCode::ACCEPTED.into_response())
}

pub(super) async fn list(state: &Arc<AppState>) -> ApiResult<Response> {
    let nodes = state.store.list_nodes().await?;
    Ok(axum::Json(NodeDirectory { nodes }).into_response())
}
