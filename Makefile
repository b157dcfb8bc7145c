# The two commands of the README's quick start: `make run` and `make test`.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: run test build bootstrap certs check lint perf-io perf-idle clean fuzz-smoke

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --release --locked

certs:
	@scripts/gen-cert.sh certs

## Build, start three demo backends and spooky on config.yaml.
run: build certs
	@scripts/run-demo.sh

## Formatting, lints, unit tests, and the end-to-end suite once per I/O driver,
## plus once with upstream TCP on the io_uring (io.upstream_io: ring).
test: bootstrap lint
	$(CARGO) test --workspace --locked --lib --bins
	SPOOKY_TEST_IO_BACKEND=uring $(CARGO) test --locked --test main
	SPOOKY_TEST_IO_BACKEND=uring SPOOKY_TEST_UPSTREAM_IO=ring $(CARGO) test --locked --test main
	SPOOKY_TEST_IO_BACKEND=epoll $(CARGO) test --locked --test main
	@scripts/fuzz-smoke.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## io_uring vs epoll on the same load: req/s, bulk MiB/s, CPU, syscalls, RSS
## (docs/perf.md). PERF_IO_ARGS="--quick" for a short run.
perf-io: build certs
	python3 perf/io_compare.py $(PERF_IO_ARGS)

## Only the idle-connection step of perf-io: RSS per idle HTTP/3 connection at
## 1,000 connections, spooky uring and epoll (and HAProxy with HAPROXY=/path).
perf-idle: build certs
	python3 perf/io_compare.py --idle-only $(PERF_IO_ARGS)

check: build certs
	target/release/spooky check --config config.yaml

## Every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 30) each, from
## the seeds in fuzz/corpus/; executions per target and a summary
## (docs/fuzzing.md). Skipped, with a line saying so, without nightly Rust.
fuzz-smoke: bootstrap
	@scripts/fuzz-smoke.sh

clean:
	$(CARGO) clean
