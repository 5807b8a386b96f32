# Kakehashi — the two commands that matter: `make demo` and `make test`.
# Both install the Debian packages they need (scripts/deps.sh) and build in
# release mode; nothing else needs setting up.

CARGO ?= cargo
BIN := target/release

.PHONY: demo demo-image image image-reproducible update-bundle recovery-medium test bench deps build lint unit system fuzz-smoke clean help

help:
	@echo "make demo   provision the box against swtpm, then hospital -> box -> WireGuard -> reading center (namespaces)"
	@echo "make test   lint, unit tests, system tests (DCMTK, Orthanc, wireguard-go, swtpm), fuzz smoke"
	@echo "make bench  relay (plain and sealed) vs direct, and the tunnel (boringtun vs wireguard-go)"
	@echo "make image  the appliance image (image-build/out: disk.img, UKIs, root hash, manifest)"
	@echo "make demo-image  the demo's story on the image in qemu (Secure Boot, swtpm, USB provisioning)"
	@echo "make image-reproducible  build the image twice and compare"
	@echo "make update-bundle  a signed RAUC bundle of the image (image-build/out/kakehashi-VERSION.raucb; docs/updates.md)"
	@echo "make recovery-medium  a USB stick image that rewrites slot A of a box neither of whose slots boots"

deps:
	scripts/deps.sh

build:
	$(CARGO) build --release --workspace --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release --locked -- -D warnings

# The image is built once per run; the qemu tests share it.
test: deps lint build image
	KAKEHASHI_BIN_DIR=$(CURDIR)/$(BIN) KAKEHASHI_IMAGE_DIR=$(CURDIR)/image-build/out \
		$(CARGO) test --release --workspace --locked
	$(MAKE) fuzz-smoke

# The appliance image, from Debian 12 packages (image-build/build.sh, as root).
image: deps build
	image-build/build.sh

image-reproducible: deps build
	image-build/reproducible.sh

# A signed RAUC bundle of that image (image-build/bundle.sh; docs/updates.md).
update-bundle: image
	image-build/bundle.sh

# A recovery stick of that image (image-build/recovery.sh; docs/updates.md).
recovery-medium: image
	image-build/recovery.sh

demo-image: image
	KAKEHASHI_IMAGE_DIR=$(CURDIR)/image-build/out $(BIN)/kakehashi-demo-image

# Every fuzz target over its seeds and thousands of mutations, on stable Rust.
fuzz-smoke:
	CARGO_TARGET_DIR=$(CURDIR)/target $(CARGO) test --release --locked --manifest-path fuzz/Cargo.toml

demo: deps build
	$(BIN)/kakehashi-demo

bench: deps build
	$(BIN)/kakehashi-bench

clean:
	$(CARGO) clean
	rm -rf .bench .demo image-build/out image-build/work
