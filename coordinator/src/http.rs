//! `GET /status` over HTTP: the status document as JSON, for people and
//! dashboards. The same bearer token as the gRPC service guards it.

use crate::state::Core;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::future::Future;
use std::sync::Arc;

async fn status(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    match headers.get(header::AUTHORIZATION) {
        Some(v) if core.token.matches_header(v.as_bytes()) => {
            Json(core.status_json()).into_response()
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong token: send `Authorization: Bearer <token>`\n",
        )
            .into_response(),
    }
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    core: Arc<Core>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new().route("/status", get(status)).with_state(core);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!("coordinator status endpoint: {e}");
    }
}
