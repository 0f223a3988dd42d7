#!/usr/bin/env bash
# Builds the release artifacts:
#   target/dist/baton-<version>-x86_64-unknown-linux-musl   (static binary)
#   target/debian/baton_<version>_amd64.deb
# Needs: rustup (fetches the musl target) and cargo-deb (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
cargo build --locked --release --target "$target" --bin baton
bin="target/$target/release/baton"

mkdir -p target/dist target/assets/completions target/debian
cp "$bin" "target/dist/baton-$version-$target"

# Man page and completions come from the clap definitions, never by hand.
"$bin" man > target/assets/baton.1
"$bin" completions bash > target/assets/completions/baton.bash
"$bin" completions zsh > target/assets/completions/_baton
"$bin" completions fish > target/assets/completions/baton.fish

if ! command -v cargo-deb > /dev/null 2>&1; then
  cargo install cargo-deb --locked --version 3.8.0
fi
cargo deb --no-build --no-strip --target "$target" \
  --output "target/debian/baton_${version}_amd64.deb"

echo "built target/dist/baton-$version-$target"
echo "built target/debian/baton_${version}_amd64.deb"
