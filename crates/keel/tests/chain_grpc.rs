//! A → B → C over gRPC with `grpc-timeout`: see `common` for what is checked.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use keel_test_support::grpc::RawCodec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_chain_propagates_remaining_deadline_and_cancels_every_hop() {
    let c = Hop::new(None, false);
    let c_addr = start(grpc_router(c.clone())).await;
    let b = Hop::new(Some(c_addr), true);
    let b_addr = start(grpc_router(b.clone())).await;
    let a = Hop::new(Some(b_addr), false);
    let a_addr = start(grpc_router(a.clone())).await;
    for hop in [&a, &b] {
        hop.warm().await;
    }
    let live_before = live_tasks();

    let request_id = "chain-grpc-1";
    let mut grpc = grpc_client(a_addr);
    let mut req = tonic::Request::new(Bytes::new());
    req.metadata_mut()
        .insert("grpc-timeout", "500m".parse().unwrap());
    for (k, v) in inbound_headers(request_id) {
        req.metadata_mut().insert(k, v.parse().unwrap());
    }
    let started = Instant::now();
    let status = grpc
        .unary(
            req,
            http::uri::PathAndQuery::from_static(GRPC_PATH),
            RawCodec,
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(took < Duration::from_millis(500 + 750), "{took:?}");

    check_chain([&a, &b, &c], request_id, live_before).await;
}
