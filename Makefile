# Kakehashi — the two commands that matter: `make demo` and `make test`.
# Both install the Debian packages they need (scripts/deps.sh) and build in
# release mode; nothing else needs setting up.

CARGO ?= cargo
BIN := target/release

.PHONY: demo test bench deps build lint unit system fuzz-smoke clean help

help:
	@echo "make demo   provision the box against swtpm, then hospital -> box -> WireGuard -> reading center (namespaces)"
	@echo "make test   lint, unit tests, system tests (DCMTK, Orthanc, wireguard-go, swtpm), fuzz smoke"
	@echo "make bench  relay (plain and sealed) vs direct, and the tunnel (boringtun vs wireguard-go)"

deps:
	scripts/deps.sh

build:
	$(CARGO) build --release --workspace --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release --locked -- -D warnings

test: deps lint build
	KAKEHASHI_BIN_DIR=$(CURDIR)/$(BIN) $(CARGO) test --release --workspace --locked
	$(MAKE) fuzz-smoke

# Every fuzz target over its seeds and thousands of mutations, on stable Rust.
fuzz-smoke:
	CARGO_TARGET_DIR=$(CURDIR)/target $(CARGO) test --release --locked --manifest-path fuzz/Cargo.toml

demo: deps build
	$(BIN)/kakehashi-demo

bench: deps build
	$(BIN)/kakehashi-bench

clean:
	$(CARGO) clean
	rm -rf .bench .demo
