#!/bin/sh
# Smoke-build the modeld RPM with this host's rpmbuild (Debian: apt-get install
# rpm rpmlint python3-build python3-installer, plus the runtime python3-*
# packages for the %check import test).
#
#   packaging/build-rpm.sh [--lint] [--keep]
#
# This only checks that packaging/rpm/modeld.spec builds and what it produces.
# Real RPMs are built in a Fedora/EL buildroot with the native macros, e.g.
#   mock -r fedora-42-x86_64 --rebuild dist/modeld-0.1.0-1.src.rpm
# An RPM built here requires python(abi) = <this host's Python> and uses this
# host's rpm macro values.
#
# The source tarball holds the tracked files plus new, not-ignored ones (so
# uncommitted work is included). Results (.rpm and .src.rpm) land in dist/.
set -eu

lint=0 keep=0
for arg in "$@"; do
    case "$arg" in
        --lint) lint=1 ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build-rpm.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
root=$(dirname -- "$here")
spec=$here/rpm/modeld.spec
clean_path=/usr/sbin:/usr/bin:/sbin:/bin

name=$(sed -n 's/^Name:[[:space:]]*//p' "$spec")
version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
tmp=$(mktemp -d "${TMPDIR:-/tmp}/modeld-rpm.XXXXXX")
if [ "$keep" = 0 ]; then
    trap 'rm -rf "$tmp"' EXIT
fi
top=$tmp/rpmbuild
mkdir -p "$top/SOURCES" "$tmp/$name-$version"

# 1. Source tarball.
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$root" ls-files -z --cached --others --exclude-standard \
        | (cd "$root" && xargs -0 sh -c 'for f; do [ -f "$f" ] || [ -L "$f" ] && printf "%s\0" "$f"; done; exit 0' sh) \
        | (cd "$root" && cpio -0 -pdm --quiet "$tmp/$name-$version")
else
    rsync -a --exclude=/.git --exclude=/.venv --exclude=/dist --exclude=/build \
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=.mypy_cache \
        --exclude=.ruff_cache --exclude=.pytest_cache --exclude=.hypothesis \
        "$root/" "$tmp/$name-$version/"
fi
tar -C "$tmp" --owner=0 --group=0 --numeric-owner -czf "$top/SOURCES/$name-$version.tar.gz" \
    "$name-$version"
cp "$here/modeld.sysusers" "$top/SOURCES/modeld.sysusers"

# 2. Build. --nodeps: this host's rpmdb knows none of the BuildRequires.
set -- PATH=$clean_path HOME="${HOME:-/root}" LC_ALL=C.UTF-8 TMPDIR="${TMPDIR:-/tmp}"
[ -n "${SOURCE_DATE_EPOCH:-}" ] && set -- "$@" "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"
env -i "$@" rpmbuild --nodeps --define "_topdir $top" -ba "$spec"

# 3. Collect.
mkdir -p "$root/dist"
cp "$top"/RPMS/noarch/"$name"-"$version"-*.noarch.rpm "$top"/SRPMS/"$name"-"$version"-*.src.rpm \
    "$root/dist/"
echo "build-rpm.sh: built:"
ls -1 "$root"/dist/"$name"-"$version"-*.rpm
[ "$keep" = 1 ] && echo "build-rpm.sh: build tree kept in $tmp"

if [ "$lint" = 1 ]; then
    # Artifacts of Debian's default rpmlint configuration, not of the spec:
    # unsigned local build, Packager/Group/BuildRoot tags that Fedora no longer
    # uses, and an old license list without SPDX "MIT". Fedora's rpmlint config
    # does not report them. The spec's own filters are in rpm/modeld.rpmlintrc.
    # (rpmlint 2.4 reads only one -r file: concatenate.)
    cp "$here/rpm/modeld.rpmlintrc" "$tmp/rpmlintrc"
    cat >> "$tmp/rpmlintrc" <<'EOF'
addFilter(r" no-signature$")
addFilter(r" no-packager-tag$")
addFilter(r" no-group-tag$")
addFilter(r" no-buildroot-tag$")
addFilter(r" invalid-license MIT$")
addFilter(r" no-manual-page-for-binary (modeld|modeldctl)$")
EOF
    # Fedora compresses man pages with gzip (brp-compress; the spec gzips them itself where
    # that is missing); Debian's rpmlint configuration expects bz2. And rpmlint 2.4 looks
    # for a binary's page under the section number instead of the page name (it reports
    # no-manual-page-for-binary for modeld(8) and modeldctl(1) that are there).
    printf 'CompressExtension = "gz"\n' > "$tmp/rpmlint.toml"
    # Exit status: rpmlint's (non-zero on errors).
    env -i PATH=$clean_path LC_ALL=C.UTF-8 HOME="${HOME:-/root}" rpmlint \
        -c "$tmp/rpmlint.toml" -r "$tmp/rpmlintrc" \
        "$root"/dist/"$name"-"$version"-*.noarch.rpm "$root"/dist/"$name"-"$version"-*.src.rpm "$spec"
fi
