#!/usr/bin/env bash
# Generates a self-signed certificate for localhost into DIR (default certs/)
# unless a pair is already there. For demos and tests only.
set -euo pipefail
dir="${1:-certs}"
mkdir -p "$dir"
if [ -s "$dir/cert.pem" ] && [ -s "$dir/key.pem" ]; then
  exit 0
fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" -days 365 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" 2>/dev/null
echo "gen-cert: wrote self-signed $dir/cert.pem and $dir/key.pem (CN=localhost)"
