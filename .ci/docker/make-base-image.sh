#!/usr/bin/env bash
# Builds a stand-in for the official `python:X.Y-slim` image and `docker import`s it under that name.
#
# The public registry is out of reach on the CI machines, so `FROM python:3.12-slim` cannot be pulled. This makes
# the same shape of image from parts the machine has: a Debian root of the host's own release (debootstrap
# --variant=minbase, mirror read from the host's apt sources), a CPython build (pyenv's) copied into /usr/local,
# and the host's CA bundle (outbound HTTPS is re-signed by a proxy here, so pip inside `RUN` needs it).
#
# Usage: make-base-image.sh WORK_DIR [CACHE_DIR]
#   WORK_DIR   scratch space (the caller removes it; nothing is left mounted under it on return)
#   CACHE_DIR  optional; the debootstrapped root is kept there as a tarball and reused when its key matches
# Env: DOCKER (client command, default `docker`; DOCKER_HOST must reach the daemon),
#      PYTHON_PREFIX (a self-contained CPython prefix to use instead of looking under pyenv).
# Prints the imported image's name (e.g. python:3.12-slim) as the last line of stdout; logs go to stderr.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin # debootstrap, chroot, ldconfig

log() { printf '[base-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ $# -ge 1 ] || die "usage: $0 WORK_DIR [CACHE_DIR]"
WORK=$1
CACHE=${2:-}
DOCKER=${DOCKER:-docker}
ROOTFS="$WORK/rootfs"

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap is not installed"

# --- which CPython ------------------------------------------------------------------------------------------
# Prefer 3.12 (the Dockerfile's default base), then 3.13, then 3.11 (the project's floor). Only self-contained
# prefixes (PREFIX/bin/pythonX.Y with PREFIX/lib/pythonX.Y) can be copied into /usr/local.
find_python_prefix() {
    if [ -n "${PYTHON_PREFIX:-}" ]; then
        printf '%s\n' "$PYTHON_PREFIX"
        return 0
    fi
    local root=${PYENV_ROOT:-/root/.pyenv} minor candidate
    for minor in 3.12 3.13 3.11; do
        candidate=$(find "$root/versions" -mindepth 1 -maxdepth 1 -name "$minor.*" 2>/dev/null \
            | grep -E "/$minor\.[0-9]+$" | sort -V | tail -n 1 || true)
        if [ -n "$candidate" ] && [ -x "$candidate/bin/python$minor" ] && [ -d "$candidate/lib/python$minor" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

PREFIX=$(find_python_prefix) \
    || die "no CPython 3.11+ build found under ${PYENV_ROOT:-/root/.pyenv}/versions (set PYTHON_PREFIX)"
PYVER=$("$PREFIX/bin/python3" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYFULL=$("$PREFIX/bin/python3" -c 'import platform; print(platform.python_version())')
[ -x "$PREFIX/bin/python$PYVER" ] || die "$PREFIX/bin/python$PYVER is missing"
IMAGE="python:$PYVER-slim"
log "CPython $PYFULL from $PREFIX -> $IMAGE"

# --- which Debian -------------------------------------------------------------------------------------------
# shellcheck disable=SC1091
CODENAME=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
[ -n "$CODENAME" ] || die "cannot tell the host's Debian codename from /etc/os-release"

# First URI that serves "$CODENAME" itself (not -security/-updates), from one-line .list files or deb822 .sources.
find_mirror() {
    local files=() f
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 1
    for f in "${files[@]}"; do
        case $f in
            *.sources)
                awk -v want="$CODENAME" '
                    function flush() {
                        if (types ~ /(^| )deb( |$)/ && enabled != "no" && suites ~ ("(^| )" want "( |$)") && uri != "")
                            { print uri; found = 1; exit }
                        types = ""; suites = ""; uri = ""; enabled = ""
                    }
                    /^[ \t]*#/ { next }
                    /^[ \t]*$/ { flush(); next }
                    tolower($1) == "types:"   { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
                    tolower($1) == "suites:"  { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
                    tolower($1) == "uris:"    { uri = $2 }
                    tolower($1) == "enabled:" { enabled = tolower($2) }
                    END { if (!found) flush() }
                ' "$f"
                ;;
            *)
                # deb [options] URI SUITE COMPONENTS...
                sed -E 's/\[[^]]*\]//' "$f" | awk -v want="$CODENAME" '$1 == "deb" && $3 == want { print $2; exit }'
                ;;
        esac
    done | head -n 1 | grep .
}
MIRROR=$(find_mirror) || die "no apt source for '$CODENAME' in /etc/apt/sources.list{,.d/*.list,.d/*.sources}"
log "Debian $CODENAME from $MIRROR"

# --- which Debian packages the copied CPython links against ---------------------------------------------------
# ldd the interpreter, libpython and every extension module (Tk's left out: no GUI in a slim image), then ask dpkg
# which package owns each library. netbase and tzdata are in the official slim image too.
pkg_for() {
    local lib=$1 out
    out=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$(readlink -f "$lib")" 2>/dev/null \
        || dpkg -S "/usr$lib" 2>/dev/null || dpkg -S "${lib#/usr}" 2>/dev/null) || return 0
    printf '%s\n' "$out" | head -n 1 | cut -d: -f1
}
mapfile -t LINKED < <(
    {
        printf '%s\n' "$PREFIX/bin/python$PYVER"
        find "$PREFIX/lib" -maxdepth 1 -name "libpython$PYVER*.so*" -type f
        find "$PREFIX/lib/python$PYVER/lib-dynload" -name '*.so' ! -name '_tkinter*'
    } | xargs ldd 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | grep -v "^$PREFIX/" | sort -u
)
PACKAGES=$(
    {
        for lib in "${LINKED[@]}"; do pkg_for "$lib"; done
        printf '%s\n' netbase tzdata
    } | sort -u | paste -sd, -
)
log "packages: $PACKAGES"

# --- the Debian root (cached) ---------------------------------------------------------------------------------
ARCH=$(dpkg --print-architecture)
KEY=$(printf '%s\n' "v1" "$CODENAME" "$MIRROR" "$ARCH" "$PACKAGES" | sha256sum | cut -c1-16)
TARBALL=${CACHE:+$CACHE/rootfs-$CODENAME-$ARCH-$KEY.tar.gz}
mkdir -p "$ROOTFS"
if [ -n "$TARBALL" ] && [ -s "$TARBALL" ] && tar -C "$ROOTFS" --numeric-owner -xpzf "$TARBALL"; then
    log "debootstrapped root from cache: $TARBALL"
else
    rm -rf "$ROOTFS" && mkdir -p "$ROOTFS"
    log "debootstrap --variant=minbase $CODENAME (no cached root)"
    debootstrap --variant=minbase --include="$PACKAGES" "$CODENAME" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
        "$ROOTFS"/var/log/* "$ROOTFS"/tmp/*
    if [ -n "$TARBALL" ]; then
        if mkdir -p "$CACHE" 2>/dev/null && tar -C "$ROOTFS" --numeric-owner -czf "$TARBALL.tmp.$$" . \
            && mv -f "$TARBALL.tmp.$$" "$TARBALL"; then
            find "$CACHE" -maxdepth 1 -name "rootfs-$CODENAME-$ARCH-*.tar.gz" ! -name "${TARBALL##*/}" -delete || true
            log "cached the root in $TARBALL"
        else
            rm -f "$TARBALL.tmp.$$"
            log "WARNING: could not cache the root in $CACHE (going on without)"
        fi
    fi
fi

# --- CPython into /usr/local ------------------------------------------------------------------------------------
# No host site-packages (pip is reinstalled from the bundled wheel by ensurepip), no test suite, no Tk, no static lib.
tar -C "$PREFIX" -cf - \
    --exclude="lib/python$PYVER/test" --exclude="lib/python$PYVER/idlelib" \
    --exclude="lib/python$PYVER/tkinter" --exclude="lib/python$PYVER/turtledemo" \
    --exclude="lib/python$PYVER/site-packages" --exclude="lib/python$PYVER/lib-dynload/_tkinter*" \
    --exclude='*.a' --exclude='__pycache__' \
    lib include \
    | tar -C "$ROOTFS/usr/local" -xf -
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/usr/local/lib/python$PYVER/site-packages"
cp -a "$PREFIX/bin/python$PYVER" "$ROOTFS/usr/local/bin/"
for tool in "python$PYVER-config" "pydoc$PYVER"; do
    [ -f "$PREFIX/bin/$tool" ] && cp -a "$PREFIX/bin/$tool" "$ROOTFS/usr/local/bin/"
done
ln -sf "python$PYVER" "$ROOTFS/usr/local/bin/python3"
ln -sf python3 "$ROOTFS/usr/local/bin/python"
[ -f "$ROOTFS/usr/local/bin/pydoc$PYVER" ] && ln -sf "pydoc$PYVER" "$ROOTFS/usr/local/bin/pydoc3"
[ -f "$ROOTFS/usr/local/bin/python$PYVER-config" ] && ln -sf "python$PYVER-config" "$ROOTFS/usr/local/bin/python3-config"
# Shebangs that still name the host prefix.
for script in "$ROOTFS"/usr/local/bin/*; do
    [ -f "$script" ] && [ ! -L "$script" ] || continue
    if head -c 2 "$script" | grep -q '^#!' && head -n 1 "$script" | grep -qF "$PREFIX"; then
        sed -i "1s|^#!.*|#!/usr/local/bin/python$PYVER|" "$script"
    fi
done

# The interpreter's RUNPATH names the host prefix; the loader falls back to ld.so.cache, which must list /usr/local/lib.
printf '/usr/local/lib\n' >"$ROOTFS/etc/ld.so.conf.d/usr-local.conf"
chroot "$ROOTFS" /sbin/ldconfig

mkdir -p "$ROOTFS/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"

chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin "python$PYVER" -m ensurepip --default-pip >/dev/null 2>&1 \
    || die "ensurepip failed in the new root"
rm -rf "$ROOTFS/root/.cache"
find "$ROOTFS/usr/local" -depth -name __pycache__ -type d -exec rm -rf {} + || true
chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin python3 -c '
import bz2, ctypes, decimal, hashlib, lzma, sqlite3, ssl, uuid, venv, zlib, json, pyexpat
import pip
print(ssl.OPENSSL_VERSION)' >&2 || die "the copied CPython does not work in the new root"
find "$ROOTFS/usr/local" -depth -name __pycache__ -type d -exec rm -rf {} + || true

# --- import -------------------------------------------------------------------------------------------------------
CERT=/etc/ssl/certs/ca-certificates.crt
tar -C "$ROOTFS" --numeric-owner -cf - . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV PYTHON_VERSION=$PYFULL" \
    --change "ENV SSL_CERT_FILE=$CERT" \
    --change "ENV PIP_CERT=$CERT" \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
log "imported $IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
printf '%s\n' "$IMAGE"
