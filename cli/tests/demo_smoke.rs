//! `keel demo --smoke`: the shop boots, takes a few seconds of mixed traffic through the
//! gateway, every order's event is consumed exactly once, one trace is laid out hop by hop,
//! and the command exits 0 (non-zero on any failure).
#![allow(clippy::unwrap_used)]

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

#[test]
fn the_demo_smoke_run_passes_and_prints_its_summary() {
    let out = std::process::Command::new(KEEL)
        .args(["demo", "--smoke", "--seconds", "2", "--concurrency", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("smoke: passed"), "{stdout}");
    assert!(stdout.contains(" 0 errors"), "{stdout}");
    for route in [
        "POST /api/orders",
        "GET /api/users/{id}",
        "GET /api/inventory/{sku}",
    ] {
        assert!(stdout.contains(route), "{route} missing:\n{stdout}");
    }
    // Every order placed was confirmed exactly once: "N of N orders confirmed exactly once".
    let line = stdout
        .lines()
        .find(|l| l.contains("confirmed exactly once"))
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "of").unwrap();
    assert_eq!(words[at - 1], words[at + 1], "{line}");
    assert_ne!(words[at - 1], "0", "{line}");
    // The example trace reaches inventory over gRPC and the consumer.
    assert!(stdout.contains("Inventory/Reserve"), "{stdout}");
    assert!(
        stdout.contains("consumer process shop.orders.placed"),
        "{stdout}"
    );
}
