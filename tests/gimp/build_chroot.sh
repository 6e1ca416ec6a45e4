#!/bin/sh
# Build a Debian chroot with GIMP 3 for the plug-in tests.
#
# usage: build_chroot.sh DEST [SUITE]
#   SUITE trixie (default): Debian 13, GIMP 3.0.4, Python 3.13
#   SUITE forky:            Debian 14 (testing), GIMP 3.2.x, Python 3.14
# Two stages: debootstrap's resolver cannot handle gimp's virtual dependencies, so first a plain
# minbase system, then apt-get inside it. Needs root and access to a Debian mirror
# ($DEBIAN_MIRROR, default http://deb.debian.org/debian). Builds into DEST.tmp and renames it
# to DEST only when everything succeeded, so an interrupted build never looks finished.
set -eu
DEST=${1:?usage: build_chroot.sh DEST [SUITE]}
SUITE=${2:-trixie}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TMP="$DEST.tmp"

if [ "$(id -u)" != 0 ]; then
    echo "build_chroot.sh: needs root (debootstrap, chroot)" >&2
    exit 2
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

# A testing/unstable suite: older debootstraps (Debian 12's) have no script named after it, and
# the mirror's Release file of a testing suite may be past its Valid-Until date.
case "$SUITE" in
    trixie) SCRIPT=""; TESTING=no ;;
    forky|sid)
        SCRIPT=/usr/share/debootstrap/scripts/$SUITE
        [ -e "$SCRIPT" ] || SCRIPT=/usr/share/debootstrap/scripts/sid
        TESTING=yes ;;
    *) echo "build_chroot.sh: unknown suite '$SUITE' (trixie, forky or sid)" >&2; exit 2 ;;
esac

rm -rf "$TMP"
mkdir -p "$(dirname "$DEST")"
# shellcheck disable=SC2086  # $SCRIPT is empty or one path
debootstrap --variant=minbase "$SUITE" "$TMP" "$MIRROR" $SCRIPT
if [ "$TESTING" = yes ]; then
    echo 'Acquire::Check-Valid-Until "false";' > "$TMP/etc/apt/apt.conf.d/99no-valid-until"
fi
# Keep package scripts from starting services inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$TMP/usr/sbin/policy-rc.d"
chmod +x "$TMP/usr/sbin/policy-rc.d"
# Skip documentation and translations: they are most of the size and the tests never need them.
cat > "$TMP/etc/dpkg/dpkg.cfg.d/01-nodoc" <<'CFG'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
chroot "$TMP" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 sh -ec '
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        gimp python3-gi gir1.2-gimp-3.0 python3-numpy python3-zmq python3-msgpack
    apt-get clean
    rm -rf /var/lib/apt/lists/*'
mkdir -p "$TMP/mnt/test"
chroot "$TMP" /usr/bin/env -i PATH=/usr/bin:/bin dpkg-query -W gimp python3 > "$TMP/.versions"
rm -rf "$DEST"
mv "$TMP" "$DEST"
echo "chroot ready: $DEST ($(tr '\n' ' ' < "$DEST/.versions"))"
