#!/usr/bin/env bash
# Unpack containerd 1.7 (Debian trixie) and 2.x (Debian sid) side by side, without touching the system's
# packages or apt lists (adding a newer suite system-wide once upgraded libc6 and more).
#
# Result: ${SHOJI_CACHE:-/var/cache/shoji}/containerd/<version>/usr/bin/{containerd,ctr,...} plus symlinks
# ${SHOJI_CACHE}/containerd/{1.7,2} -> <version>, each with its package's etc/containerd/config.toml.
# Debian bookworm's 1.6 stays at /usr/bin/containerd (hack/setup.sh installs it); its packaged
# config.toml is kept in ${SHOJI_CACHE}/containerd/1.6-conffiles/etc/containerd/ (the install tests
# start from it, whatever this host's /etc/containerd/config.toml became).
# Idempotent: a version already unpacked is not downloaded again (no network at all unless `--update`).
set -euo pipefail

CACHE="${SHOJI_CACHE:-/var/cache/shoji}/containerd"
SUITES=(trixie:1.7 sid:2)

mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/shoji-containerd.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# A private apt configuration: its own sources list, lists, caches and status, so `apt-get update` here never
# changes what the system's apt sees. Only `update`, `show` and `download` run with it (never install).
apt_private() {
    local tool=$1 dir=$2
    shift 2
    "$tool" -q \
        -o Dir::Etc::sourcelist="$dir/sources.list" \
        -o Dir::Etc::sourceparts=/nonexistent \
        -o Dir::State="$dir/state" \
        -o Dir::State::status="$dir/state/status" \
        -o Dir::Cache="$dir/cache" \
        -o Debug::NoLocking=1 \
        -o APT::Sandbox::User=root \
        "$@"
}

fetch_suite() {
    local suite=$1 alias=$2
    local tmp=$WORK/$suite
    mkdir -p "$tmp/state/lists/partial" "$tmp/cache/archives/partial" "$tmp/dl"
    : >"$tmp/state/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
        >"$tmp/sources.list"
    apt_private apt-get "$tmp" update >/dev/null
    local version
    version=$(apt_private apt-cache "$tmp" show "containerd" 2>/dev/null | awk '/^Version:/ && !v {v = $2} END {print v}')
    [ -n "$version" ] || { echo "install-containerd: no containerd package in Debian $suite" >&2; return 1; }
    local dest="$CACHE/$version"
    if [ -x "$dest/usr/bin/containerd" ]; then
        echo "containerd $version ($suite) already in $dest"
    else
        (cd "$tmp/dl" && apt_private apt-get "$tmp" download "containerd=$version" >/dev/null)
        local deb
        deb=$(ls "$tmp"/dl/containerd_*.deb)
        rm -rf "$dest.partial"
        dpkg-deb -x "$deb" "$dest.partial"
        mv "$dest.partial" "$dest"
    fi
    ln -sfn "$version" "$CACHE/$alias"
}

# bookworm's packaged config.toml: the file on disk while dpkg says it is unmodified, else from
# the installed version's package.
conffile_1_6() {
    local dest=$CACHE/1.6-conffiles/etc/containerd/config.toml want version
    [ ! -f "$dest" ] || return 0
    version=$(dpkg-query -W -f='${Version}' containerd 2>/dev/null) ||
        { echo "install-containerd: Debian's containerd package is not installed (hack/setup.sh installs it)" >&2; return 1; }
    want=$(dpkg-query -W -f='${Conffiles}\n' containerd | awk '$1 == "/etc/containerd/config.toml" { print $2 }')
    mkdir -p "$(dirname "$dest")"
    if [ -n "$want" ] && [ -f /etc/containerd/config.toml ] &&
        [ "$(md5sum </etc/containerd/config.toml | cut -d' ' -f1)" = "$want" ]; then
        cp /etc/containerd/config.toml "$dest.partial"
    else
        mkdir -p "$WORK/bookworm"
        (cd "$WORK/bookworm" && apt-get download -q "containerd=$version" >/dev/null)
        dpkg-deb -x "$WORK"/bookworm/containerd_*.deb "$WORK/bookworm/root"
        cp "$WORK/bookworm/root/etc/containerd/config.toml" "$dest.partial"
    fi
    mv "$dest.partial" "$dest"
    echo "containerd $version: packaged config.toml in $dest"
}
conffile_1_6

for entry in "${SUITES[@]}"; do
    alias=${entry##*:}
    # Offline fast path: already unpacked. `--update` looks for a newer package in the suite.
    if [ "${1:-}" != --update ] && [ -x "$CACHE/$alias/usr/bin/containerd" ]; then
        continue
    fi
    fetch_suite "${entry%%:*}" "$alias"
done

# The k8s-cri crate (CRI client in the tests) compiles the CRI proto with protoc.
if ! command -v protoc >/dev/null; then
    apt-get install -y -q protobuf-compiler >/dev/null
fi

echo "system: $(/usr/bin/containerd --version)"
for alias in 1.7 2; do
    echo "$CACHE/$alias: $("$CACHE/$alias/usr/bin/containerd" --version)"
done
