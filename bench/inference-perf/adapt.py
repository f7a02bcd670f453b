"""Converts inference-perf's per-request report into fleetpick's request records.

    python3 adapt.py REPORT OUT [SUMMARY]   # REPORT: per_request_lifecycle_metrics.json, or its directory

inference-perf (0.7.0) writes, with report.request_lifecycle.per_request: true, the file
per_request_lifecycle_metrics.json: a JSON array with one object per request:

    start_time, end_time    time.perf_counter() seconds (CLOCK_MONOTONIC: one clock across its
                            worker processes); start is taken just before the POST is sent
    info.response_metrics   (per_request_fields.info: true) for a streamed response:
                            chunk_times, the arrival time of every SSE event that carried text
                            (role-only, usage-only and [DONE] events excluded); server_usage
    error                   null, or {error_type, error_msg}: error_type is "HTTP Error <status>"
                            for a non-200 answer, else the Python exception's class name
    request, response       the bodies (per_request_fields.request / .response)

OUT gets a JSON array of fleetpick's records (crates/loadgen/src/lib.rs RequestRecord), sorted by start:

    {"start_us": int, "first_token_us": int|null, "end_us": int, "status": int,
     "server": null, "error": str|null}

- Times are microseconds from the earliest start_time in the report.
- first_token_us: the first text-bearing chunk's time. Like fleetpick's own client, a successful
  request with no such chunk (not streamed, or no text) gets its end time; a failed one null.
  (fleetpick's client stamps the first body chunk of any kind, so its TTFT can be earlier on a
  server that sends a role-only chat chunk ahead of the first token; the simulator writes that
  chunk together with the first token, so there the two agree.)
- status: 200 without error; N for "HTTP Error N"; 200 for the errors that can only happen
  once a 200 response has started (a broken or unparseable body); 0 for the rest (no response:
  connection refused or reset, timeout), as fleetpick's client does.
- server: always null: inference-perf does not keep response headers (x-sim-server).
- error: "<error_type>: <error_msg>", at most 500 characters.

When the run had several stages (a rate sweep), OUT's stem also gets one file per stage,
OUT.stage_<i>.json, whose times start at that stage's first request: inference-perf's
per-request entries carry no stage id, but its stages run one after another, so the entries in
start order split by the request counts of stage_<i>_lifecycle_metrics.json (checked: no stage
overlaps the next).

Also prints a one-line summary to stderr, and writes it as JSON to SUMMARY if given: counts,
and TTFT and end-to-end p50/p90/p99 in ms over successful requests, by nearest rank as
fleetpick's summary does.
"""

import json
import math
import os
import re
import sys
from typing import Any, Optional

REPORT_NAME = "per_request_lifecycle_metrics.json"

# Exceptions raised only after a 200 response had begun: its body broke or could not be parsed.
AFTER_RESPONSE_ERRORS = {
    "ClientPayloadError",
    "TransferEncodingError",
    "ContentLengthError",
    "ContentTypeError",
    "JSONDecodeError",
    "StreamInterruptedError",
}


def status_of(error: Optional[dict[str, Any]]) -> int:
    if error is None:
        return 200
    kind = str(error.get("error_type") or "")
    if kind.startswith("HTTP Error "):
        try:
            return int(kind.removeprefix("HTTP Error ").strip())
        except ValueError:
            return 0
    return 200 if kind in AFTER_RESPONSE_ERRORS else 0


def first_chunk_time(entry: dict[str, Any]) -> Optional[float]:
    info = entry.get("info") or {}
    metrics = info.get("response_metrics") or {}
    times = metrics.get("chunk_times") or metrics.get("output_token_times") or []
    return min(times) if times else None


def convert(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not entries:
        return []
    t0 = min(float(e["start_time"]) for e in entries)

    def us(t: float) -> int:
        return max(0, int(round((t - t0) * 1e6)))

    records = []
    for e in entries:
        error = e.get("error")
        status = status_of(error)
        end_us = us(float(e["end_time"]))
        first = first_chunk_time(e)
        first_us: Optional[int] = us(first) if first is not None else None
        message = None
        if error is not None:
            message = f"{error.get('error_type')}: {error.get('error_msg')}"[:500]
        elif first_us is None and status == 200:
            first_us = end_us
        records.append(
            {
                "start_us": us(float(e["start_time"])),
                "first_token_us": first_us,
                "end_us": end_us,
                "status": status,
                "server": None,
                "error": message,
            }
        )
    records.sort(key=lambda r: r["start_us"])
    return records


def percentiles(values: list[float]) -> Optional[dict[str, float]]:
    if not values:
        return None
    v = sorted(values)

    def at(q: float) -> float:
        return v[min(max(math.ceil(q * len(v)), 1), len(v)) - 1]

    return {"p50": round(at(0.50), 3), "p90": round(at(0.90), 3), "p99": round(at(0.99), 3)}


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200 and r["error"] is None]
    wall = max((r["end_us"] for r in records), default=0) / 1e6
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "wall_seconds": round(wall, 3),
        "ttft_ms": percentiles(
            [(r["first_token_us"] - r["start_us"]) / 1000 for r in ok if r["first_token_us"] is not None]
        ),
        "e2e_ms": percentiles([(r["end_us"] - r["start_us"]) / 1000 for r in ok]),
    }


def stages(report_dir: str) -> list[dict[str, Any]]:
    """Stage id, requested rate and request count, from stage_<i>_lifecycle_metrics.json."""
    found = []
    for name in os.listdir(report_dir):
        m = re.fullmatch(r"stage_(\d+)_lifecycle_metrics\.json", name)
        if not m:
            continue
        with open(os.path.join(report_dir, name)) as f:
            load = (json.load(f) or {}).get("load_summary") or {}
        found.append({"stage": int(m.group(1)), "rate": load.get("requested_rate"), "count": load.get("count")})
    return sorted(found, key=lambda s: s["stage"])


def split_by_stage(
    entries: list[dict[str, Any]], stage_list: list[dict[str, Any]]
) -> Optional[list[list[dict[str, Any]]]]:
    """The entries of each stage, or None if that cannot be told.

    The per-request report does not say which stage a request belonged to, but inference-perf
    runs stages one after the other (the next starts once every request of the last has ended),
    so in start order the first count_0 entries are stage 0's, the next count_1 stage 1's...
    The split is checked: each stage's last end must precede the next stage's first start.
    """
    counts = [s["count"] for s in stage_list]
    if not all(isinstance(c, int) for c in counts) or sum(counts) != len(entries):
        return None
    ordered = sorted(entries, key=lambda e: float(e["start_time"]))
    groups, i = [], 0
    for c in counts:
        groups.append(ordered[i : i + c])
        i += c
    for a, b in zip(groups, groups[1:]):
        if a and b and max(float(e["end_time"]) for e in a) > min(float(e["start_time"]) for e in b):
            return None
    return groups


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(f"usage: {sys.argv[0]} REPORT OUT [SUMMARY]  (REPORT: {REPORT_NAME} or its directory)")
    src, out = sys.argv[1], sys.argv[2]
    if os.path.isdir(src):
        src = os.path.join(src, REPORT_NAME)
    if not os.path.isfile(src):
        sys.exit(
            f"adapt.py: {src} does not exist: inference-perf writes it only with"
            " report.request_lifecycle.per_request: true"
        )
    with open(src) as f:
        entries = json.load(f)
    if entries and "info" not in entries[0]:
        print(
            "adapt.py: warning: the report has no 'info' (per_request_fields.info: false), so there"
            " are no first-token times; successful requests get their end time instead",
            file=sys.stderr,
        )
    records = convert(entries)
    write_json(out, records)
    totals = summary(records)
    # A run of several stages (a rate sweep): one more file per stage, times from its own start.
    stage_list = stages(os.path.dirname(os.path.abspath(src)))
    if len(stage_list) > 1:
        groups = split_by_stage(entries, stage_list)
        if groups is None:
            print(
                "adapt.py: warning: cannot split the records by stage (counts or times disagree);"
                " only the whole run is written",
                file=sys.stderr,
            )
        else:
            base = out[:-5] if out.endswith(".json") else out
            totals["stages"] = []
            for stage, group in zip(stage_list, groups):
                path = f"{base}.stage_{stage['stage']}.json"
                stage_records = convert(group)
                write_json(path, stage_records)
                totals["stages"].append(
                    {"stage": stage["stage"], "rate": stage["rate"], "file": path, **summary(stage_records)}
                )
    if len(sys.argv) == 4:
        write_json(sys.argv[3], totals)
    print(f"adapt.py: {out}: {json.dumps(totals)}", file=sys.stderr)


def write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
