//! The gateway: Keel's configured proxy with the shop's routes (`[gateway]` in its config,
//! `SHOP_*` overrides; see `keel_shop::gateway`), `[clients.user]`, `[clients.order]`,
//! `[clients.inventory]`. `SHOP_INSTANCE` tags its answers.
fn main() -> std::process::ExitCode {
    keel::run("gateway", |app| async move {
        let settings = keel_shop::gateway::from_env(&app.config().gateway)
            .map_err(|e| keel::Error::Other(e.into()))?;
        let routes = keel_shop::gateway::router(&app, settings)
            .await
            .map_err(keel::Error::Other)?;
        app.serve(keel_shop::http::tag_instance(
            routes,
            keel_shop::instance("gateway"),
        ))
        .await
    })
}
