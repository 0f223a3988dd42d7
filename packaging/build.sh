#!/usr/bin/env bash
# Builds the release artifacts, in cargo's target directory (target/, or
# wherever CARGO_TARGET_DIR or build.target-dir puts it):
#   <target dir>/dist/baton-<version>-x86_64-unknown-linux-musl   (static binary)
#   <target dir>/debian/baton_<version>_amd64.deb
# Needs: rustup (fetches the musl target) and cargo-deb (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [ -z "$target_dir" ]; then
  echo "cargo metadata names no target_directory" >&2
  exit 1
fi

if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
cargo build --locked --release --target "$target" -p baton --bin baton
release="$target_dir/$target/release"
bin="$release/baton"
static="$target_dir/dist/baton-$version-$target"
deb="$target_dir/debian/baton_${version}_amd64.deb"

mkdir -p "$target_dir/dist" "$target_dir/debian" "$release/assets/completions"
cp "$bin" "$static"

# Man page and completions come from the clap definitions, never by hand.
# They go beside the binary: cargo-deb maps the `target/release/` of the
# asset paths in Cargo.toml to this directory, whatever the target dir. It
# compresses no asset from there, so the man page is gzipped here (-n: no
# name or time stamp, the same bytes every build).
"$bin" man | gzip -9n > "$release/assets/baton.1.gz"
"$bin" completions bash > "$release/assets/completions/baton.bash"
"$bin" completions zsh > "$release/assets/completions/_baton"
"$bin" completions fish > "$release/assets/completions/baton.fish"

if ! command -v cargo-deb > /dev/null 2>&1; then
  cargo install cargo-deb --locked --version 3.8.0
fi
cargo deb -p baton --no-build --no-strip --target "$target" --output "$deb"

echo "built $static"
echo "built $deb"
