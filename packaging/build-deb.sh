#!/bin/sh
# Build the modeld .deb (Architecture: all) with native debhelper tooling.
#
#   packaging/build-deb.sh [--install-deps] [--lint] [--keep] [--version VERSION]
#
#   --install-deps  apt-get install the Build-Depends first (needs root)
#   --lint          run lintian -EvIL +pedantic on the result (fails on any
#                   error, warning, info, pedantic or experimental tag that
#                   debian/modeld.lintian-overrides does not override)
#   --keep          keep the temporary build tree (its path is printed)
#   --version V     build version V instead of debian/changelog's (a new
#                   changelog entry in the build tree only; used by the
#                   upgrade test to build "N+1", e.g. 0.1.0+test1)
#
# The source tree (tracked files plus new, not-ignored ones, so uncommitted work
# is included) is copied to a temporary directory, packaging/debian becomes
# ./debian there, and dpkg-buildpackage runs with a clean environment so that
# Debian's /usr/bin/python3 and python3-* packages are used (not pyenv, a venv
# or PYTHONPATH). The .deb and its .buildinfo/.changes land in dist/.
set -eu

install_deps=0 lint=0 keep=0 new_version=
while [ $# -gt 0 ]; do
    case "$1" in
        --install-deps) install_deps=1 ;;
        --lint) lint=1 ;;
        --keep) keep=1 ;;
        --version) [ $# -ge 2 ] || { echo "build-deb.sh: --version needs a value" >&2; exit 2; }
                   new_version=$2; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
root=$(dirname -- "$here")
clean_path=/usr/sbin:/usr/bin:/sbin:/bin

version=$(PATH=$clean_path dpkg-parsechangelog -l "$here/debian/changelog" -S Version)
if [ -n "$new_version" ]; then
    case "$new_version" in *[!A-Za-z0-9.+~-]*|'') echo "build-deb.sh: bad version '$new_version'" >&2; exit 2;; esac
    base_version=$version version=$new_version
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/modeld-deb.XXXXXX")
if [ "$keep" = 0 ]; then
    trap 'rm -rf "$tmp"' EXIT
fi
src="$tmp/modeld-$version"
mkdir -p "$src"

# 1. Copy the source tree.
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files that exist in the work tree.
    git -C "$root" ls-files -z --cached --others --exclude-standard \
        | (cd "$root" && xargs -0 sh -c 'for f; do [ -f "$f" ] || [ -L "$f" ] && printf "%s\0" "$f"; done; exit 0' sh) \
        | (cd "$root" && cpio -0 -pdm --quiet "$src")
else
    rsync -a --exclude=/.git --exclude=/.venv --exclude=/dist --exclude=/build \
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=.mypy_cache \
        --exclude=.ruff_cache --exclude=.pytest_cache --exclude=.hypothesis \
        --exclude=/debian "$root/" "$src/"
fi

# 2. packaging/debian -> ./debian (dereferencing symlinks: a link into the
#    tree would dangle, and dh_installsystemd skips dangling units silently).
rm -rf "$src/debian"
cp -rL "$here/debian" "$src/debian"
if [ -n "$new_version" ]; then
    maintainer=$(PATH=$clean_path dpkg-parsechangelog -l "$here/debian/changelog" -S Maintainer)
    when=$(PATH=$clean_path dpkg-parsechangelog -l "$here/debian/changelog" -S Timestamp)
    when=$(LC_ALL=C date -R -u -d "@$((when + 86400))")    # a day after the entry it follows
    { printf 'modeld (%s) unstable; urgency=medium\n\n' "$version"
      printf '  * Rebuild of %s as %s (build-deb.sh --version).\n\n' "$base_version" "$version"
      printf ' -- %s  %s\n\n' "$maintainer" "$when"
      cat "$here/debian/changelog"; } > "$src/debian/changelog"
fi

# 3. Build dependencies.
if [ "$install_deps" = 1 ]; then
    env -i PATH=$clean_path DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends build-essential fakeroot lintian
    env -i PATH=$clean_path DEBIAN_FRONTEND=noninteractive \
        apt-get build-dep -y "$src"
fi

# 4. Build, with only what dpkg-buildpackage needs from the environment.
set -- PATH=$clean_path HOME="${HOME:-/root}" LC_ALL=C.UTF-8 TMPDIR="${TMPDIR:-/tmp}"
for var in DEB_BUILD_OPTIONS DEB_BUILD_PROFILES SOURCE_DATE_EPOCH; do
    eval "val=\${$var-}"
    [ -n "$val" ] && set -- "$@" "$var=$val"
done
(cd "$src" && env -i "$@" dpkg-buildpackage -us -uc -b)

# 5. Collect the results.
mkdir -p "$root/dist"
for f in "$tmp"/modeld_"$version"_*.deb "$tmp"/modeld_"$version"_*.buildinfo \
         "$tmp"/modeld_"$version"_*.changes; do
    [ -e "$f" ] && cp "$f" "$root/dist/"
done
deb=$(ls "$root"/dist/modeld_"$version"_all.deb)
echo "build-deb.sh: built $deb"

[ "$keep" = 1 ] && echo "build-deb.sh: build tree kept in $src"
if [ "$lint" = 1 ]; then
    # Every tag counts, down to pedantic and experimental ones (--fail-on).
    env -i PATH=$clean_path LC_ALL=C.UTF-8 lintian -EvIL +pedantic \
        --fail-on error,warning,info,pedantic,experimental \
        "$root/dist/modeld_${version}_$(PATH=$clean_path dpkg --print-architecture).changes"
fi
