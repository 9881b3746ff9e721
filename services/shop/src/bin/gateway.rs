//! The gateway. `SHOP_API_KEYS`, `SHOP_RATE`, `SHOP_BURST`, `SHOP_INSTANCE`;
//! `[clients.user]`, `[clients.order]`, `[clients.inventory]` in its config.
fn main() -> std::process::ExitCode {
    keel::run("gateway", |app| async move {
        let settings =
            keel_shop::gateway::Settings::from_env().map_err(|e| keel::Error::Other(e.into()))?;
        let routes = keel_shop::gateway::router(&app, settings).map_err(keel::Error::Other)?;
        app.serve(keel_shop::http::tag_instance(
            routes,
            keel_shop::instance("gateway"),
        ))
        .await
    })
}
