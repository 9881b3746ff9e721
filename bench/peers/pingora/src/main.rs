//! pingora-proxy-peer LISTEN_ADDR UPSTREAM_ADDR
//!
//! The smallest pingora reverse proxy that does what the Keel gateway does in S0: every request
//! forwarded over HTTP/1.1 to one upstream, with upstream connections kept alive and reused.
//! A benchmark peer (bench/s0-gateway.py), not a product: no TLS, no logger, one worker.

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_proxy::{ProxyHttp, Session};
use std::net::SocketAddr;

struct OneUpstream(SocketAddr);

#[async_trait]
impl ProxyHttp for OneUpstream {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        // Plain HTTP (tls = false, no SNI). The peer's defaults are HTTP/1.1, and pingora's
        // connector pools idle upstream connections keyed by the peer, so the same peer every
        // time means keep-alive reuse, like nginx's `keepalive` and haproxy's `http-reuse`.
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
    // Every other hook keeps its default; `logging` is a no-op by default, and no `log` backend
    // is installed, so nothing is written per request.
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: pingora-proxy-peer LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR must be ip:port");

    // Built in code rather than from a YAML file so the binary needs nothing beside it.
    let conf = ServerConf {
        // One worker thread for the proxy service, as the gateway, nginx and haproxy get.
        threads: 1,
        // The benchmark stops each proxy with SIGTERM, which pingora treats as a graceful
        // shutdown (5 min grace period by default): make it exit at once instead.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    // No Opt: pingora's own command line (daemon, upgrade, test ...) is not wanted here.
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, OneUpstream(upstream));
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
