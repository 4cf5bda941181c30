#!/bin/sh
# Rebuild atrium/static/editor.bundle.js and editor.bundle.LICENSES.txt from npm:
# the exact versions in web/package-lock.json (change them with npm install <pkg>@<version>
# in web/, then run this again and commit the lock and both files).
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
node build.mjs
