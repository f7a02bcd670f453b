#!/usr/bin/env bash
# Runs inference-perf against one OpenAI-compatible base URL, fully offline, and converts its
# per-request report into fleetpick's request records (OUT_DIR/records.json).
#
#   bench/inference-perf/run.sh URL MODEL CONFIG OUT_DIR [--section.field VALUE ...]
#
#   URL      base URL of the server or gateway, e.g. http://127.0.0.1:8080 (http:// is added
#            when missing); inference-perf appends /v1/completions or /v1/chat/completions
#   MODEL    the model name sent in each request, e.g. meta-llama/Llama-3.1-8B-Instruct
#   CONFIG   an inference-perf YAML config (configs/ has examples): workload, load, report
#   OUT_DIR  created if missing; gets inference-perf/ (its own reports), inference-perf.log,
#            records.json (the converted records) and records.summary.json
#   any further arguments go to inference-perf as command-line overrides of CONFIG, e.g.
#            --load.stages '[{"rate": 8, "duration": 30}]' --api.streaming false
#
# What this script sets on top of CONFIG (as overrides): server.base_url, server.model_name,
# tokenizer.pretrained_model_name_or_path (the local tokenizer/ beside this script, unless
# CONFIG or the extra arguments name another), storage.local_storage.path and
# report.request_lifecycle.per_request: true. The Hugging Face libraries run with
# HF_HUB_OFFLINE=1: nothing is downloaded. The last line of stdout is the path of records.json.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $# -lt 4 ]]; then
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
url="$1" model="$2" config="$3" out="$4"
shift 4
[[ "$url" == http://* || "$url" == https://* ]] || url="http://$url"
url="${url%/}"
[[ -f "$config" ]] || { echo "run.sh: no config file at $config" >&2; exit 2; }

cli="$("$here/install.sh" | tail -n 1)"
python="$(dirname "$cli")/python"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
reports="$out/inference-perf"
rm -rf "$reports"

tokenizer_args=(--tokenizer.pretrained_model_name_or_path "$here/tokenizer")
config_names_tokenizer="$("$python" -c '
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])) or {}
print(bool((cfg.get("tokenizer") or {}).get("pretrained_model_name_or_path")))' "$config")"
if [[ "$config_names_tokenizer" == True || " $* " == *" --tokenizer.pretrained_model_name_or_path "* ]]; then
    tokenizer_args=()
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TRANSFORMERS_VERBOSITY=error
# No proxy for the target: benchmarks here go to loopback addresses.
export NO_PROXY="*" no_proxy="*"

echo "run.sh: inference-perf -> $url ($model), config $config, reports in $reports" >&2
set +e
"$cli" --config_file "$config" \
    --server.base_url "$url" \
    --server.model_name "$model" \
    "${tokenizer_args[@]}" \
    --storage.local_storage.path "$reports" \
    --report.request_lifecycle.per_request true \
    "$@" > "$out/inference-perf.log" 2>&1
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
    echo "run.sh: inference-perf exited with status $rc; the end of $out/inference-perf.log:" >&2
    tail -n 30 "$out/inference-perf.log" >&2
    exit 1
fi

"$python" "$here/adapt.py" "$reports" "$out/records.json" "$out/records.summary.json"
echo "$out/records.json"
