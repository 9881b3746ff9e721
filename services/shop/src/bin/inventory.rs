//! The inventory service. `SHOP_DB` (default `sqlite://shop-inventory.db`), `SHOP_INSTANCE`;
//! `[messaging]` names the broker (NATS when order runs in another process).
fn main() -> std::process::ExitCode {
    keel::run("inventory", |app| async move {
        let db = keel_shop::db::open(&keel_shop::env_db("inventory"))
            .await
            .map_err(keel::Error::Other)?;
        let bus = keel_shop::standalone_bus(&app).await?;
        let counters = keel_shop::events::Counters::default();
        let routes = keel_shop::inventory::router(&app, db, &bus, &counters)
            .await
            .map_err(keel::Error::Other)?;
        app.serve(keel_shop::http::tag_instance(
            routes,
            keel_shop::instance("inventory"),
        ))
        .await
    })
}
