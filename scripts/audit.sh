#!/usr/bin/env bash
# The dependency audit: `cargo deny check` against deny.toml (licenses, bans, sources), and the
# RustSec advisories when their database can be fetched (it lives on GitHub, which some build
# machines cannot reach: then the advisories are reported as not checked, and the rest still
# must pass). Installs cargo-deny from crates.io if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DENY_VERSION=0.20.2
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "audit: installing cargo-deny $DENY_VERSION (crates.io)" >&2
    cargo install cargo-deny --locked --version "$DENY_VERSION"
fi
cargo deny check licenses bans sources
if timeout 120 cargo deny fetch db >/dev/null 2>&1; then
    cargo deny check --disable-fetch advisories
else
    echo "audit: the RustSec advisory database cannot be fetched from here: advisories NOT checked" >&2
fi
