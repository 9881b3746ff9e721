//! The user service. `SHOP_DB` (default `sqlite://shop-user.db`), `SHOP_INSTANCE`.
fn main() -> std::process::ExitCode {
    keel::run("user", |app| async move {
        let db = keel_shop::db::open(&keel_shop::env_db("user"))
            .await
            .map_err(keel::Error::Other)?;
        let routes = keel_shop::user::router(&app, db)
            .await
            .map_err(keel::Error::Other)?;
        app.serve(keel_shop::http::tag_instance(
            routes,
            keel_shop::instance("user"),
        ))
        .await
    })
}
