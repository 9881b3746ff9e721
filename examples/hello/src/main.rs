//! The Keel example service.
//!
//! Run with `cargo run -p keel-example-hello`, then
//! `curl localhost:8080/` and `curl localhost:9990/readyz?verbose`.
//! Addresses come from `KEEL_SERVER__ADDR` and `KEEL_ADMIN__ADDR`; every other key from
//! `docs/operations.md` works the same way, or through `--config FILE` / `--set key=value`.

use std::process::ExitCode;

fn main() -> ExitCode {
    keel::run("hello", |app| async move {
        // A dependency check that always passes shows up in /readyz?verbose; real services
        // register their database, broker, etc. here.
        app.readiness()
            .check("self", || async { Ok::<(), String>(()) });
        app.serve(keel_example_hello::routes()).await
    })
}
