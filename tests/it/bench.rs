//! The benchmark harness's smoke run: the seconds-long scenario through every strategy, behind
//! the real Envoy. It asserts that each strategy completed its requests and that the report was
//! written; nothing about speed (that is for `fleetpick bench`, not for tests).

use fleetpick_tests as common;

#[tokio::test]
async fn smoke_scenario_runs_every_strategy_and_writes_the_report() {
    let path = common::repo("bench/scenarios/smoke.yaml");
    let scenario = fleetpick_lab::bench::Scenario::load(&path).unwrap();
    let results = fleetpick_lab::bench::run(&scenario, |_| {}).await.unwrap();
    let cells: Vec<(&str, Option<usize>)> = results
        .cells
        .iter()
        .map(|c| (c.strategy.as_str(), c.concurrency))
        .collect();
    // Each strategy at the offered rate, then in the closed loop (its highest rate).
    let mut expected = Vec::new();
    for s in [
        "round-robin",
        "least-request",
        "locality-round-robin",
        "fleetpick",
        "fleetpick-kv-only",
    ] {
        expected.extend([(s, None), (s, Some(4))]);
    }
    assert_eq!(cells, expected);
    for c in &results.cells {
        assert!(c.requests > 0, "{} sent nothing", c.strategy);
        assert_eq!(
            (c.ok, c.errors),
            (c.requests, 0),
            "{} did not complete its requests",
            c.strategy
        );
        if c.concurrency.is_none() {
            assert_eq!(
                c.windows[0].requests, c.requests,
                "{}: one window, the whole cell",
                c.strategy
            );
        }
        let names: Vec<&str> = c.classes.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["interactive", "batch"], "{}", c.strategy);
        assert_eq!(
            c.classes.iter().map(|k| k.requests).sum::<usize>(),
            c.requests,
            "{}: the classes make up the cell",
            c.strategy
        );
        assert_eq!(
            c.per_server.values().sum::<usize>(),
            c.ok,
            "{}: every answer names its server",
            c.strategy
        );
    }
    let dir = common::scratch("bench");
    fleetpick_lab::bench::report::write(&results, dir.path(), "test").unwrap();
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("| fleetpick-kv-only |"), "{md}");
    assert!(md.contains("measured after 0.5 s of warm-up load"), "{md}");
    assert!(
        md.contains("## Workload classes") && md.contains("| batch | 10.0 | fleetpick |"),
        "{md}"
    );
    assert!(
        md.contains("| whole | 10.0 | fleetpick |"),
        "the window is reported: {md}"
    );
    assert!(
        md.contains("| fleetpick | closed loop, 4 clients |")
            && md.contains("## Against round robin: added latency"),
        "{md}"
    );
    let png = std::fs::read(dir.path().join("ttft-p90.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the plot is a PNG");
    let back: fleetpick_lab::bench::Results =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(back.cells.len(), 10);
}
