"""Tests of adapt.py on hand-made inference-perf report entries: python3 test_adapt.py"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapt  # noqa: E402


def entry(start, end, chunks=None, error=None):
    info = {"request_metrics": {"text": {"input_tokens": 10}}}
    if chunks is not None:
        info["response_metrics"] = {"output_tokens": len(chunks), "chunk_times": chunks, "output_token_times": chunks}
    return {"start_time": start, "end_time": end, "info": info, "error": error}


class Convert(unittest.TestCase):
    def test_times_are_microseconds_from_the_first_start(self):
        recs = adapt.convert([entry(101.5, 102.0, [101.75, 101.9]), entry(100.0, 100.5, [100.25])])
        self.assertEqual(
            recs,
            [
                {"start_us": 0, "first_token_us": 250000, "end_us": 500000, "status": 200, "server": None, "error": None},
                {"start_us": 1500000, "first_token_us": 1750000, "end_us": 2000000, "status": 200, "server": None,
                 "error": None},
            ],
        )

    def test_unstreamed_success_takes_its_end_as_first_token(self):
        (rec,) = adapt.convert([entry(1.0, 1.2)])
        self.assertEqual((rec["first_token_us"], rec["end_us"]), (200000, 200000))

    def test_statuses(self):
        recs = adapt.convert(
            [
                entry(1.0, 1.1, error={"error_type": "HTTP Error 503", "error_msg": "{}"}),
                entry(2.0, 2.1, error={"error_type": "ClientConnectorError", "error_msg": "refused"}),
                entry(3.0, 3.1, error={"error_type": "ClientPayloadError", "error_msg": "broken"}),
                entry(4.0, 4.1, error={"error_type": "TimeoutError", "error_msg": "Request timed out"}),
            ]
        )
        self.assertEqual([r["status"] for r in recs], [503, 0, 200, 0])
        self.assertEqual([r["first_token_us"] for r in recs], [None] * 4)
        self.assertEqual(recs[1]["error"], "ClientConnectorError: refused")

    def test_stages_split_in_start_order(self):
        entries = [entry(1.0, 1.5, [1.1]), entry(1.2, 1.8, [1.3]), entry(3.0, 3.5, [3.1])]
        stage_list = [{"stage": 0, "rate": 1.0, "count": 2}, {"stage": 1, "rate": 2.0, "count": 1}]
        groups = adapt.split_by_stage(list(reversed(entries)), stage_list)
        self.assertEqual([len(g) for g in groups], [2, 1])
        # Overlapping stages, or counts that do not add up, cannot be split.
        self.assertIsNone(adapt.split_by_stage([entry(1.0, 3.5), entry(3.0, 3.2)], [dict(s, count=1) for s in stage_list]))
        self.assertIsNone(adapt.split_by_stage(entries, [dict(s, count=1) for s in stage_list]))


class Cli(unittest.TestCase):
    def test_writes_records_per_stage_and_summary(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, adapt.REPORT_NAME), "w") as f:
                json.dump([entry(1.0, 1.5, [1.1]), entry(3.0, 3.5, [3.2])], f)
            for i, rate in enumerate([1.0, 2.0]):
                with open(os.path.join(d, f"stage_{i}_lifecycle_metrics.json"), "w") as f:
                    json.dump({"load_summary": {"count": 1, "requested_rate": rate}}, f)
            out = os.path.join(d, "records.json")
            subprocess.run(
                [sys.executable, adapt.__file__, d, out, os.path.join(d, "summary.json")],
                check=True,
                capture_output=True,
            )
            with open(out) as f:
                self.assertEqual([r["start_us"] for r in json.load(f)], [0, 2000000])
            with open(os.path.join(d, "records.stage_1.json")) as f:
                self.assertEqual(json.load(f)[0]["first_token_us"], 200000)
            with open(os.path.join(d, "summary.json")) as f:
                summary = json.load(f)
            self.assertEqual((summary["requests"], summary["ok"], len(summary["stages"])), (2, 2, 2))
            self.assertEqual(summary["ttft_ms"]["p50"], 100.0)


if __name__ == "__main__":
    unittest.main()
