//! The report of a scenario run: results as JSON, a Markdown page with the table of every cell,
//! the comparisons the project tracks (as ratios against baselines measured in the same run),
//! and the plot of time to first token against offered rate (`ttft-p90.png`).

use std::fmt::Write;
use std::path::Path;

use super::plot::{Series, line_chart_png};
use super::{BenchError, CellResult, Results};

/// A strategy's cells at offered rates (closed-loop cells left out).
fn cells<'a>(r: &'a Results, strategy: &'a str) -> impl Iterator<Item = &'a CellResult> + 'a {
    r.cells
        .iter()
        .filter(move |c| c.strategy == strategy && c.concurrency.is_none())
}

/// The strategies in the order the scenario lists them.
fn strategy_names(r: &Results) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for c in &r.cells {
        if !names.contains(&c.strategy.as_str()) {
            names.push(&c.strategy);
        }
    }
    names
}

fn p90(c: &CellResult) -> Option<f64> {
    c.ttft_ms.as_ref().map(|p| p.p90)
}

/// The comparison the project tracks: at the lowest rate where round robin's time-to-first-token
/// p90 is at least twice its value at the lowest rate, each strategy's p90 over round robin's
/// and over least request's.
pub fn knee_comparison(r: &Results) -> Option<String> {
    let rr: Vec<&CellResult> = cells(r, "round-robin").collect();
    let base = p90(rr.first()?)?;
    let knee = rr
        .iter()
        .find(|c| p90(c).is_some_and(|v| v >= 2.0 * base))?;
    let rr_p90 = p90(knee)?;
    let lr_p90 = cells(r, "least-request")
        .find(|c| c.rate == knee.rate)
        .and_then(p90);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "At {:.1} requests/s round robin's time-to-first-token p90 is {:.0} ms, {:.1}x its {:.0} ms at {:.1}/s.\n",
        knee.rate,
        rr_p90,
        rr_p90 / base,
        base,
        rr.first().map_or(0.0, |c| c.rate)
    );
    let _ = writeln!(
        out,
        "| strategy | TTFT p90 (ms) | / round robin | / least request |\n|---|---|---|---|"
    );
    for name in strategy_names(r) {
        if let Some(v) = cells(r, name).find(|c| c.rate == knee.rate).and_then(p90) {
            let lr = lr_p90.map_or("-".into(), |l| format!("{:.2}", v / l));
            let _ = writeln!(out, "| {name} | {v:.0} | {:.2} | {lr} |", v / rr_p90);
        }
    }
    Some(out)
}

/// What each strategy adds to round robin's end-to-end latency at each offered rate, and the
/// highest rate each sustains in the closed loop, as ratios to round robin. Meant for fast
/// backends (the overhead scenario), where the difference is the cost of the path itself.
pub fn overhead_comparison(r: &Results) -> Option<String> {
    let rr: Vec<&CellResult> = r
        .cells
        .iter()
        .filter(|c| c.strategy == "round-robin")
        .collect();
    if rr.is_empty() || r.cells.iter().all(|c| c.strategy == "round-robin") {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| strategy | offered/s | e2e p50 (ms) | added p50 | p99 (ms) | added p99 |\n|---|---|---|---|---|---|"
    );
    for c in r.cells.iter().filter(|c| c.concurrency.is_none()) {
        let Some(base) = rr
            .iter()
            .find(|b| b.concurrency.is_none() && b.rate == c.rate)
            .and_then(|b| b.e2e_ms.as_ref())
        else {
            continue;
        };
        let Some(p) = &c.e2e_ms else { continue };
        let added = |v: f64, b: f64| {
            if c.strategy == "round-robin" {
                "(baseline)".to_string()
            } else {
                format!("{:+.2} ({:.2}x)", v - b, v / b)
            }
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {} | {:.2} | {} |",
            c.strategy,
            c.rate,
            p.p50,
            added(p.p50, base.p50),
            p.p99,
            added(p.p99, base.p99)
        );
    }
    let closed: Vec<&CellResult> = r.cells.iter().filter(|c| c.concurrency.is_some()).collect();
    if let Some(base) = closed.iter().find(|c| c.strategy == "round-robin") {
        let _ = writeln!(
            out,
            "\nHighest rate sustained, closed loop of {} clients:\n\n| strategy | ok/s | errors | / round robin |\n|---|---|---|---|",
            base.concurrency.unwrap_or(0)
        );
        for c in &closed {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} | {:.2} |",
                c.strategy,
                c.ok_per_second,
                c.errors,
                c.ok_per_second / base.ok_per_second.max(f64::MIN_POSITIVE)
            );
        }
    }
    Some(out)
}

/// fleetpick's own CPU per cell: seconds over the cell's load, per request, the `/metrics`
/// scrapes made, and the ratio to the first strategy with fleetpick at the same rate (with the
/// difference spread over the scrapes, when the cell scraped and the baseline did not).
pub fn picker_cpu_comparison(r: &Results) -> Option<String> {
    let with_cpu: Vec<&CellResult> = r
        .cells
        .iter()
        .filter(|c| c.picker_cpu_seconds.is_some() && c.concurrency.is_none())
        .collect();
    let first = with_cpu.first()?.strategy.clone();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| strategy | offered/s | requests | fleetpick CPU (s) | per request (µs) | /metrics scrapes | CPU / {first} | per scrape over {first} (µs) |\n|---|---|---|---|---|---|---|---|"
    );
    for c in &with_cpu {
        let cpu = c.picker_cpu_seconds.unwrap_or(0.0);
        let base_cell = with_cpu
            .iter()
            .find(|b| b.strategy == first && b.rate == c.rate);
        let base = base_cell.and_then(|b| b.picker_cpu_seconds);
        let base_scraped = base_cell.is_some_and(|b| b.metrics_scrapes.is_some());
        let ratio = base.map_or("-".to_string(), |b| format!("{:.3}", cpu / b.max(1e-9)));
        let per_scrape = match (base, c.metrics_scrapes) {
            (Some(b), Some(n)) if n > 0 && !base_scraped => {
                format!("{:.0}", (cpu - b) / n as f64 * 1e6)
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {:.2} | {:.0} | {} | {ratio} | {per_scrape} |",
            c.strategy,
            c.rate,
            c.requests,
            cpu,
            cpu / c.requests.max(1) as f64 * 1e6,
            c.metrics_scrapes.map_or("-".to_string(), |n| n.to_string()),
        );
    }
    Some(out)
}

/// Each part (window or workload class) of each rate cell, in the first cell's order, with the
/// part's time-to-first-token p90 as a ratio to the first strategy's for the same part and rate
/// ("-" when either has none). `row` gets the part's cell, the part and the ratio.
fn per_part<'a, T: 'a>(
    r: &'a Results,
    parts: impl Fn(&'a super::CellResult) -> &'a [T],
    ttft: impl Fn(&T) -> Option<&fleetpick_loadgen::Percentiles>,
    mut row: impl FnMut(&super::CellResult, &T, String),
) {
    let Some(first) = r.cells.first() else {
        return;
    };
    let base_name = &first.strategy;
    for i in 0..parts(first).len() {
        for c in r.cells.iter().filter(|c| c.concurrency.is_none()) {
            let Some(part) = parts(c).get(i) else {
                continue;
            };
            let base = cells(r, base_name)
                .find(|b| b.rate == c.rate)
                .and_then(|b| parts(b).get(i))
                .and_then(&ttft)
                .map(|p| p.p90);
            let ratio = match (ttft(part), base) {
                (Some(p), Some(b)) if b > 0.0 => format!("{:.2}", p.p90 / b),
                _ => "-".into(),
            };
            row(c, part, ratio);
        }
    }
}

/// Each window of each cell (requests that started in it): time-to-first-token p90 and
/// errors, with the p90 as a ratio to the first strategy's in the same window and rate.
pub fn window_comparison(r: &Results) -> Option<String> {
    let first = r.cells.first()?;
    if first.windows.is_empty() {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| window | offered/s | strategy | requests | errors | TTFT p50 | p90 | p99 (ms) | p90 / {} |\n|---|---|---|---|---|---|---|---|---|",
        first.strategy
    );
    per_part(
        r,
        |c| &c.windows,
        |w| w.ttft_ms.as_ref(),
        |c, w, ratio| {
            let [p50, p90, p99] = pct(&w.ttft_ms);
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {} | {} | {p50} | {p90} | {p99} | {ratio} |",
                w.name, c.rate, c.strategy, w.requests, w.errors
            );
        },
    );
    Some(out)
}

/// Each workload class of each cell: goodput, requests shed, time to first token, with the
/// p90 as a ratio to the first strategy's for the same class and rate.
pub fn class_comparison(r: &Results) -> Option<String> {
    let first = r.cells.first()?;
    if first.classes.is_empty() {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| class | offered/s | strategy | requests | ok/s (goodput) | shed (429) | other errors | TTFT p50 | p90 | p99 (ms) | p90 / {} |\n|---|---|---|---|---|---|---|---|---|---|---|",
        first.strategy
    );
    per_part(
        r,
        |c| &c.classes,
        |k| k.ttft_ms.as_ref(),
        |c, k, ratio| {
            let [p50, p90, p99] = pct(&k.ttft_ms);
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {} | {:.2} | {} | {} | {p50} | {p90} | {p99} | {ratio} |",
                k.name,
                c.rate,
                c.strategy,
                k.requests,
                k.ok_per_second,
                k.shed,
                k.errors.saturating_sub(k.shed)
            );
        },
    );
    Some(out)
}

fn pct(p: &Option<fleetpick_loadgen::Percentiles>) -> [String; 3] {
    match p {
        Some(p) => [
            format!("{:.0}", p.p50),
            format!("{:.0}", p.p90),
            format!("{:.0}", p.p99),
        ],
        None => ["-".into(), "-".into(), "-".into()],
    }
}

/// The Markdown page.
pub fn markdown(r: &Results, command: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Scenario `{}`\n", r.scenario);
    if !r.description.is_empty() {
        let _ = writeln!(out, "{}\n", r.description.trim());
    }
    let _ = writeln!(
        out,
        "Command: `{command}`. Machine: {}. Date: {}. {} simulated servers; {} s per cell{}; every cell on a fresh fleet, through the real Envoy.\n",
        r.machine,
        r.date,
        r.servers,
        r.duration_s,
        if r.warmup_s > 0.0 {
            format!(", measured after {} s of warm-up load", r.warmup_s)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "| strategy | offered/s | ok/s | errors | TTFT p50 | p90 | p99 (ms) | ITL p50 (ms) | e2e p90 (ms) | prefix hit rate | busiest / even |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in &r.cells {
        let [t50, t90, t99] = pct(&c.ttft_ms);
        let itl = c
            .itl_ms
            .as_ref()
            .map_or("-".into(), |p| format!("{:.1}", p.p50));
        let e2e = pct(&c.e2e_ms)[1].clone();
        let offered = match c.concurrency {
            Some(n) => format!("closed loop, {n} clients"),
            None => format!("{:.1}", c.rate),
        };
        let _ = writeln!(
            out,
            "| {} | {offered} | {:.2} | {} | {t50} | {t90} | {t99} | {itl} | {e2e} | {:.3} | {:.2} |",
            c.strategy, c.ok_per_second, c.errors, c.prefix_hit_rate, c.max_share_over_even
        );
    }
    if r.cells.iter().any(|c| c.ttft_long_ms.is_some()) {
        let _ = writeln!(
            out,
            "\n## Short and long prompts\n\n| strategy | offered/s | short TTFT p50 | p90 | p99 (ms) | long TTFT p50 | p90 | p99 (ms) |\n|---|---|---|---|---|---|---|---|"
        );
        for c in &r.cells {
            let [s50, s90, s99] = pct(&c.ttft_short_ms);
            let [l50, l90, l99] = pct(&c.ttft_long_ms);
            let _ = writeln!(
                out,
                "| {} | {:.1} | {s50} | {s90} | {s99} | {l50} | {l90} | {l99} |",
                c.strategy, c.rate
            );
        }
    }
    if let Some(w) = window_comparison(r) {
        let _ = writeln!(out, "\n## Windows\n\n{w}");
    }
    if let Some(c) = class_comparison(r) {
        let _ = writeln!(out, "\n## Workload classes\n\n{c}");
    }
    if r.cells.iter().any(|c| c.concurrency.is_some())
        && let Some(o) = overhead_comparison(r)
    {
        let _ = writeln!(
            out,
            "\n## Against round robin: added latency, highest rate\n\n{o}"
        );
    }
    if let Some(c) = picker_cpu_comparison(r) {
        let _ = writeln!(out, "\n## fleetpick's CPU\n\n{c}");
    }
    if let Some(k) = knee_comparison(r) {
        let _ = writeln!(out, "\n## At round robin's knee\n\n{k}");
    }
    if r.prefix_upper_bound > 0.0 {
        let _ = writeln!(
            out,
            "\n## Prefix cache\n\nUpper bound (share of prompt tokens in shared prefix blocks): {:.3}. Hit rate over the bound, per strategy at the highest rate:\n",
            r.prefix_upper_bound
        );
        let top = r.cells.iter().map(|c| c.rate).fold(0.0, f64::max);
        for c in r.cells.iter().filter(|c| c.rate == top) {
            let _ = writeln!(
                out,
                "- {}: {:.3} ({:.2} of the bound)",
                c.strategy,
                c.prefix_hit_rate,
                c.prefix_hit_rate / r.prefix_upper_bound
            );
        }
    }
    out
}

/// Writes `results.json`, `report.md` and `ttft-p90.png` into `dir`.
pub fn write(r: &Results, dir: &Path, command: &str) -> Result<(), BenchError> {
    let io = |what: &str| {
        let what = format!("{what} in {}", dir.display());
        move |source| BenchError::Io { what, source }
    };
    std::fs::create_dir_all(dir).map_err(io("cannot create the output directory"))?;
    let json = serde_json::to_vec_pretty(r).map_err(|e| BenchError::Io {
        what: "cannot encode the results".into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(dir.join("results.json"), json).map_err(io("cannot write results.json"))?;
    std::fs::write(dir.join("report.md"), markdown(r, command))
        .map_err(io("cannot write report.md"))?;
    let mut series: Vec<Series> = Vec::new();
    for c in r.cells.iter().filter(|c| c.concurrency.is_none()) {
        let Some(p) = &c.ttft_ms else { continue };
        match series.iter_mut().find(|s| s.name == c.strategy) {
            Some(s) => s.points.push((c.rate, p.p90)),
            None => series.push(Series {
                name: c.strategy.clone(),
                points: vec![(c.rate, p.p90)],
            }),
        }
    }
    line_chart_png(
        &dir.join("ttft-p90.png"),
        &format!(
            "{}: time to first token p90 against offered rate",
            r.scenario
        ),
        "offered rate (requests/s)",
        "TTFT p90 (ms)",
        &series,
    )
    .map_err(|e| BenchError::Io {
        what: format!("cannot draw {}/ttft-p90.png", dir.display()),
        source: std::io::Error::other(e),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::utc_now;
    use fleetpick_loadgen::Percentiles;

    fn cell(strategy: &str, rate: f64, p90: f64) -> CellResult {
        CellResult {
            strategy: strategy.into(),
            rate,
            concurrency: None,
            requests: 10,
            ok: 10,
            errors: 0,
            ok_per_second: rate,
            ttft_ms: Some(Percentiles {
                p50: p90 / 2.0,
                p90,
                p99: p90 * 2.0,
            }),
            itl_ms: None,
            e2e_ms: None,
            ttft_short_ms: None,
            ttft_long_ms: None,
            prefix_hit_rate: 0.5,
            per_server: Default::default(),
            max_share_over_even: 1.0,
            windows: Vec::new(),
            classes: Vec::new(),
            picker_cpu_seconds: None,
            metrics_scrapes: None,
        }
    }

    #[test]
    fn knee_is_where_round_robin_doubles() {
        let r = Results {
            scenario: "t".into(),
            description: String::new(),
            date: utc_now(),
            machine: "m".into(),
            servers: 2,
            duration_s: 1.0,
            warmup_s: 0.0,
            prefix_upper_bound: 0.6,
            cells: vec![
                cell("round-robin", 1.0, 100.0),
                cell("round-robin", 2.0, 150.0),
                cell("round-robin", 4.0, 400.0),
                cell("least-request", 4.0, 300.0),
                cell("fleetpick", 4.0, 200.0),
            ],
        };
        let k = knee_comparison(&r).unwrap();
        assert!(k.contains("At 4.0 requests/s"), "{k}");
        assert!(k.contains("| fleetpick | 200 | 0.50 | 0.67 |"), "{k}");
        let md = markdown(&r, "cmd");
        assert!(
            md.contains("Upper bound") && md.contains("fleetpick: 0.500 (0.83 of the bound)"),
            "{md}"
        );
    }

    #[test]
    fn overhead_is_against_round_robin_at_the_same_rate() {
        let with = |strategy: &str, rate: f64, p50: f64, concurrency: Option<usize>| {
            // Closed-loop cells have ten times the TTFT: a knee, if they counted as a rate.
            let mut c = cell(
                strategy,
                rate,
                if concurrency.is_some() { 1000.0 } else { 100.0 },
            );
            c.e2e_ms = Some(Percentiles {
                p50,
                p90: p50 * 2.0,
                p99: p50 * 4.0,
            });
            c.concurrency = concurrency;
            c.ok_per_second = 1000.0 / p50;
            c
        };
        let r = Results {
            scenario: "o".into(),
            description: String::new(),
            date: utc_now(),
            machine: "m".into(),
            servers: 2,
            duration_s: 1.0,
            warmup_s: 0.0,
            prefix_upper_bound: 0.0,
            cells: vec![
                with("round-robin", 500.0, 1.0, None),
                with("round-robin", 0.0, 2.0, Some(8)),
                with("fleetpick", 500.0, 1.5, None),
                with("fleetpick", 0.0, 4.0, Some(8)),
            ],
        };
        let o = overhead_comparison(&r).unwrap();
        assert!(
            o.contains("| fleetpick | 500 | 1.50 | +0.50 (1.50x) | 6.00 | +2.00 (1.50x) |"),
            "{o}"
        );
        assert!(o.contains("closed loop of 8 clients"), "{o}");
        assert!(o.contains("| fleetpick | 250 | 0 | 0.50 |"), "{o}");
        let md = markdown(&r, "cmd");
        assert!(
            md.contains("closed loop, 8 clients") && md.contains("added latency"),
            "{md}"
        );
        // The closed-loop cells are not a point on the rate axis.
        assert!(knee_comparison(&r).is_none());
    }

    #[test]
    fn windows_compare_with_the_first_strategy() {
        let with = |strategy: &str, p90: f64, errors: usize| {
            let mut c = cell(strategy, 8.0, p90);
            c.windows = vec![super::super::WindowResult {
                name: "loss".into(),
                requests: 40,
                errors,
                ttft_ms: Some(Percentiles {
                    p50: p90 / 2.0,
                    p90,
                    p99: p90,
                }),
            }];
            c
        };
        let r = Results {
            scenario: "w".into(),
            description: String::new(),
            date: utc_now(),
            machine: "m".into(),
            servers: 2,
            duration_s: 1.0,
            warmup_s: 0.0,
            prefix_upper_bound: 0.0,
            cells: vec![
                with("locality-round-robin", 400.0, 7),
                with("fleetpick", 100.0, 1),
            ],
        };
        let w = window_comparison(&r).unwrap();
        assert!(
            w.contains("| loss | 8.0 | fleetpick | 40 | 1 | 50 | 100 | 100 | 0.25 |"),
            "{w}"
        );
        assert!(markdown(&r, "c").contains("## Windows"));
    }
}
