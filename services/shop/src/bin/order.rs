//! The order service. `SHOP_DB` (default `sqlite://shop-order.db`), `SHOP_INSTANCE`;
//! `[clients.user]`, `[clients.inventory]` (h2c) and `[messaging]` in its config.
fn main() -> std::process::ExitCode {
    keel::run("order", |app| async move {
        let db = keel_shop::db::open(&keel_shop::env_db("order"))
            .await
            .map_err(keel::Error::Other)?;
        let bus = keel_shop::standalone_bus(&app).await?;
        let counters = keel_shop::events::Counters::default();
        let routes = keel_shop::order::router(&app, db, bus, &counters)
            .await
            .map_err(keel::Error::Other)?;
        app.serve(keel_shop::http::tag_instance(
            routes,
            keel_shop::instance("order"),
        ))
        .await
    })
}
