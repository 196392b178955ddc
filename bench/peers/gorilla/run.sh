#!/usr/bin/env bash
# gorilla/websocket chat example (Debian's source package), one hub per ?room=NAME.
# Usage: run.sh PORT   -- builds on first use, then execs the server on 127.0.0.1:PORT.
set -euo pipefail
PORT=${1:?usage: run.sh PORT}
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=$HERE/build                       # ignored by git
BIN=$BUILD/chat
GOCODE=/usr/share/gocode                # where Debian's golang-*-dev packages put their source

log() { echo "gorilla: $*" >&2; }

apt_install() {
    log "installing $*"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# deb-src for the suite the machine runs, once, if no deb-src source is configured at all.
ensure_deb_src() {
    if grep -rqsE '^(Types:.*\bdeb-src\b|deb-src[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    local suite uri
    suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 '/debian$' || true)
    uri=${uri:-http://deb.debian.org/debian}
    log "adding deb-src $uri $suite main"
    cat >/etc/apt/sources.list.d/confab-deb-src.sources <<EOF
Types: deb-src
URIs: $uri
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -qq >/dev/null
}

build() {
    local need=()
    command -v go >/dev/null || need+=(golang-go)
    [ -d $GOCODE/src/github.com/gorilla/websocket ] || need+=(golang-github-gorilla-websocket-dev)
    command -v dpkg-source >/dev/null || need+=(dpkg-dev)
    [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
    ensure_deb_src

    rm -rf "$BUILD"
    mkdir -p "$BUILD/src" "$BUILD/gopath/src/chat"
    log "fetching the example with apt-get source golang-github-gorilla-websocket"
    (cd "$BUILD/src" && apt-get source -qq golang-github-gorilla-websocket >/dev/null 2>&1)
    local example
    example=$(echo "$BUILD"/src/golang-github-gorilla-websocket-*/examples/chat)
    cp "$example"/*.go "$example"/home.html "$BUILD/gopath/src/chat/"
    patch -s -d "$BUILD/gopath/src/chat" -p1 <"$HERE/rooms.patch"
    (cd "$BUILD/gopath/src/chat" && GOPATH="$BUILD/gopath:$GOCODE" GO111MODULE=off go build -o "$BIN.tmp" .)
    mv "$BIN.tmp" "$BIN"
}

# Rebuild when the patch changed since the last build.
if [ ! -x "$BIN" ] || [ "$HERE/rooms.patch" -nt "$BIN" ]; then
    build
fi

ulimit -n "$(ulimit -Hn)"
cd "$BUILD/gopath/src/chat"             # serveHome reads home.html from the working directory
exec "$BIN" -addr "127.0.0.1:$PORT"
