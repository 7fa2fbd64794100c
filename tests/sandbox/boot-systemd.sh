#!/bin/bash
# boot-systemd.sh - modeld's integration-test sandbox: boot a REAL systemd (PID 1
# of new PID/mount/UTS/IPC/cgroup namespaces) with its own D-Bus system bus and
# journald, without touching the host.  Needs root (real root, initial user ns).
#
#   boot-systemd.sh start [NAME]        boot detached; prints KEY=VALUE lines
#   boot-systemd.sh run   [NAME]        boot, print KEY=VALUE lines, wait for EOF on
#                                       stdin (or SIGTERM/SIGINT/SIGHUP), then stop.
#                                       Used by the pytest fixture (tests/sandbox/).
#   boot-systemd.sh stop  NAME|BASE     graceful poweroff, SIGKILL fallback, cleanup
#   boot-systemd.sh exec  NAME -- CMD.. run CMD inside (nsenter -m -p -u -i -C [-n])
#   boot-systemd.sh logs  NAME [ARGS]   journalctl -D <journal dir> ARGS, from the host
#   boot-systemd.sh gc                  remove leftovers of dead instances (also run
#                                       by every start)
#
# Printed by start/run (one KEY=VALUE a line, shell-sourceable, BOOT_BREAKDOWN_MS last):
#   NAME BASE SYSTEMD_PID (host pid of the namespace's PID 1) UNSHARE_PID NETNS
#   RUN_DIR=$BASE/run (the namespace's /run: sockets there are reachable from the host)
#   DBUS_SYSTEM_BUS_ADDRESS=unix:path=$BASE/run/dbus/system_bus_socket (host-usable)
#   JOURNAL_DIR=$BASE/run/log/journal   CGROUP_MODE=v1-hybrid|v2
#   MEMCG_DIR (host path of the dedicated cgroup carrying the memory controller;
#   a unit's ControlGroup= is relative to it)  CGROUPS (all dedicated cgroups, ':')
#   BOOT_MS  BOOT_BREAKDOWN_MS
#
# How the host is protected (each point fixes a real side effect seen before):
#   * PID 1 runs with container=systemd-harness (no clock/SELinux/kmsg/core_pattern
#     setup, no umount/swapoff at shutdown) and a capability bounding set without
#     sys_module, sys_time, syslog, sys_rawio, sys_pacct, mac_*, wake_alarm,
#     block_suspend.
#   * /proc/sys (and /proc/sysrq-trigger) and /sys are read-only: no sysctl bumps.
#   * / is read-only; /tmp stays shared and writable; OVERLAY_PATHS (default /var)
#     get a throw-away overlay (StateDirectory=, DynamicUser= work).
#   * /dev is a private tmpfs (null zero full random urandom tty, own devpts and
#     /dev/shm; no console, no kmsg).  /run is $BASE/run.  LIBMOUNT_UTAB is private.
#   * cgroups: "$CG_PREFIX-NAME" children of the launcher's cgroup in every
#     hierarchy; the namespace gets fresh cgroup mounts made inside its cgroup
#     namespace, so everything systemd creates lands below them.  Removed at stop.
#   * a private unit universe: SYSTEMD_UNIT_PATH (no trailing colon: replaces the
#     search path) = /run/systemd/{system.control,transient,system} (test units go
#     in $RUN_DIR/systemd/system) + /run/harness/units (stub targets, dbus,
#     journald, shutdown units linked from /lib/systemd/system).  No generators.
#   * journald with Storage=volatile (logs in $BASE/run/log/journal).
#   * run mode: the launcher gets PDEATHSIG=KILL tied to this script, and
#     unshare --kill-child kills PID 1 when unshare dies: if the runner dies, the
#     namespace dies at once; the next start's gc removes what is left on disk.
#   * every PID we signal is checked against its recorded start time (PID reuse);
#     stop and gc serialise on a flock of $BASE.
#
# D-Bus: dbus-daemon runs with a config of its own (/run/harness/dbus/system.conf)
# that includes the distro's /usr/share/dbus-1/system.conf, then a copy of each
# file of DBUS_POLICY_FILES (':'-separated, in order), then the directory
# /run/harness/dbus/system.d (for policy added at runtime + ReloadConfig).
# DBUS_SERVICE_DIRS (':'-separated) are copied and added as <servicedir>s for bus
# activation (use SystemdService= in the .service files: --systemd-activation).
#
# Tunables (environment): HARNESS_ROOT (/tmp/sdh)  CG_PREFIX (modeld-test)
#   NETNS (0; 1 = own network namespace)  OVERLAY_PATHS ("/var")
#   UNITS_DIR (files copied to /run/systemd/system before boot)
#   DBUS_POLICY_FILES  DBUS_SERVICE_DIRS  BOOT_TIMEOUT (30)  STOP_TIMEOUT (20)
#   SYSTEMD_BIN (/lib/systemd/systemd)  PYTHON (readiness listener; /usr/bin/python3)
#   ROOT_DIR: boot this directory as / instead of the host's (an installed system,
#     e.g. a Debian root made by mmdebstrap with systemd and dbus in it).  Its own
#     unit files, generators, default target (multi-user.target) and D-Bus
#     configuration are used as they are; it stays writable (the caller owns it and
#     can write into it from the host).  /proc, /sys, /dev, /run and the cgroups are
#     set up as above, then pivot_root makes ROOT_DIR the namespace's /.  The host's
#     / is not visible inside; OVERLAY_PATHS, /tmp sharing and DBUS_* do not apply.
#
# Known limits: tested on hybrid cgroups (v1 memory) only; on a pure cgroup v2
# host the unshare process sitting in the namespace's root cgroup would keep
# systemd from enabling controllers (no-internal-process rule).  host-side
# systemctl does not work (use exec, or D-Bus via DBUS_SYSTEM_BUS_ADDRESS).
set -euo pipefail

SELF=$(readlink -f "$0")
HARNESS_ROOT=${HARNESS_ROOT:-/tmp/sdh}     # keep short: AF_UNIX paths max 107 bytes
CG_PREFIX=${CG_PREFIX:-modeld-test}
NETNS=${NETNS:-0}
OVERLAY_PATHS=${OVERLAY_PATHS-/var}
UNITS_DIR=${UNITS_DIR:-}
DBUS_POLICY_FILES=${DBUS_POLICY_FILES:-}
DBUS_SERVICE_DIRS=${DBUS_SERVICE_DIRS:-}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-30}
STOP_TIMEOUT=${STOP_TIMEOUT:-20}
SYSTEMD_BIN=${SYSTEMD_BIN:-/lib/systemd/systemd}
ROOT_DIR=${ROOT_DIR:-}
if [ -z "${PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
DROP_CAPS=-sys_module,-sys_time,-syslog,-sys_rawio,-sys_pacct,-mac_admin,-mac_override,-wake_alarm,-block_suspend

die()  { echo "boot-systemd: $*" >&2; exit 1; }
log()  { echo "boot-systemd: $*" >&2; }
now_ms() { local t; t=$(</proc/uptime); t=${t%% *}; echo $(( ${t%.*} * 1000 + 10#${t#*.} * 10 )); }

# ---------------------------------------------------------------- pid helpers
# field 22 of /proc/PID/stat (start time) guards against PID reuse
pid_starttime() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; set -- $s; echo "${20}"; }
pid_alive() {   # exists and is not a zombie
    local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }; set -- $st
    [ "$1" != Z ] && [ "$1" != X ]
}
pid_is() { [ -n "$1" ] && pid_alive "$1" && [ "$(pid_starttime "$1")" = "$2" ]; }

# ------------------------------------------------------------- cgroup helpers
cg_mountpoint() {   # $1 = hierarchy id, $2 = controllers ("" for cgroup2) -> mount point
    awk -v hid="$1" -v want="$2" '
    { for (i = 7; i <= NF; i++) if ($i == "-") { sep = i; break }
      fstype = $(sep + 1); sopts = $(sep + 3); mp = $5
      if ($4 != "/") next
      if (hid == "0") { if (fstype == "cgroup2") { print mp; exit }; next }
      if (fstype != "cgroup") next
      n = split(want, w, ","); split(sopts, s, ","); delete have
      for (k in s) have[s[k]] = 1
      ok = 1; for (j = 1; j <= n; j++) if (!(w[j] in have)) ok = 0
      if (ok) { print mp; exit } }' /proc/self/mountinfo
}

cg_create() {   # mkdir <mnt><own cgroup>/$CG_PREFIX-$NAME in every hierarchy; record them
    local hid ctrls rel mnt dir parent
    : > "$STATE/cgroups"; : > "$STATE/memcg"
    while IFS=: read -r hid ctrls rel; do
        mnt=$(cg_mountpoint "$hid" "$ctrls")
        [ -n "$mnt" ] || { log "no mount for cgroup hierarchy '$hid:$ctrls', skipped"; continue; }
        parent="$mnt${rel%/}"
        dir="$parent/$CG_PREFIX-$NAME"
        mkdir "$dir"
        echo "$dir" >> "$STATE/cgroups"
        if [ -f "$dir/cpuset.cpus" ]; then     # v1 cpuset refuses tasks until set
            cat "$parent/cpuset.cpus" > "$dir/cpuset.cpus"
            cat "$parent/cpuset.mems" > "$dir/cpuset.mems"
        fi
        # where memory is accounted: the v1 memory hierarchy, else cgroup2
        case ",$ctrls," in *,memory,*) echo "$dir" > "$STATE/memcg";; esac
        if [ "$hid" = 0 ] && [ ! -s "$STATE/memcg" ] && grep -qw memory "$mnt/cgroup.controllers" 2>/dev/null; then
            echo "$dir" > "$STATE/memcg"
        fi
    done < /proc/self/cgroup
}

cg_remove() {   # depth-first rmdir of the recorded cgroups, retried (exiting tasks)
    [ -f "$STATE/cgroups" ] || return 0
    local dir try left
    for try in $(seq 1 100); do
        left=0
        while read -r dir; do
            [ -n "$dir" ] && [ -d "$dir" ] || continue
            case "$dir" in /sys/fs/cgroup/*"$CG_PREFIX"-*) ;; *) log "refusing odd cgroup $dir"; continue;; esac
            find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ -d "$dir" ] && left=1
        done < "$STATE/cgroups"
        [ "$left" = 0 ] && return 0
        sleep 0.05
    done
    log "could not remove all cgroups listed in $STATE/cgroups"; return 1
}

cgroup_mode() {
    if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then echo v2; else echo v1-hybrid; fi
}

# ------------------------------------------------------------------ D-Bus
xml_path() {   # a path fit for a config file element, or die
    case "$1" in /*) ;; *) die "not an absolute path: $1";; esac
    case "$1" in *[\<\>\&\"]*) die "path with XML special characters: $1";; esac
    printf '%s' "$1"
}

write_dbus_config() {   # own bus config, used through a dbus.service drop-in
    local D=$BASE/run/harness/dbus f d i=0
    mkdir -p "$D/policy" "$D/system.d" "$D/services"
    {
        echo '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"'
        echo ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">'
        echo '<!-- written by boot-systemd.sh -->'
        echo '<busconfig>'
        echo '  <include>/usr/share/dbus-1/system.conf</include>'
        local IFS=:
        for d in $DBUS_SERVICE_DIRS; do
            [ -n "$d" ] || continue
            [ -d "$d" ] || die "DBUS_SERVICE_DIRS: no directory $d"
            i=$((i + 1)); mkdir "$D/services/$i"; cp -a "$d"/. "$D/services/$i/"
            echo "  <servicedir>/run/harness/dbus/services/$i</servicedir>"
        done
        # copies: the namespace cannot see the host's /run, and the originals
        # may be removed (tmp dirs) while the bus still runs
        for f in $DBUS_POLICY_FILES; do
            [ -n "$f" ] || continue
            [ -f "$f" ] || die "DBUS_POLICY_FILES: no file $f"
            i=$((i + 1)); cp "$f" "$D/policy/$i-$(basename "$f")"
            echo "  <include>$(xml_path "/run/harness/dbus/policy/$i-$(basename "$f")")</include>"
        done
        echo '  <includedir>/run/harness/dbus/system.d</includedir>'
        echo '</busconfig>'
    } > "$D/system.conf"
    mkdir -p "$BASE/run/harness/units/dbus.service.d"
    cat > "$BASE/run/harness/units/dbus.service.d/zz-harness.conf" <<EOF
[Service]
ExecStart=
ExecStart=$(command -v dbus-daemon) --config-file=/run/harness/dbus/system.conf --address=systemd: --nofork --nopidfile --systemd-activation --syslog-only
EOF
}

# --------------------------------------------------------------- unit files
write_units() {   # populate $BASE/run (the namespace's /run) before boot
    local R=$BASE/run U=$BASE/run/harness/units t
    mkdir -p "$U" "$R/harness/empty" "$R/systemd/system" "$R/systemd/system.conf.d" \
             "$R/systemd/journald.conf.d" "$R/systemd/transient" "$R/systemd/system.control"
    # stub targets: names unit files commonly reference; none pulls anything in
    for t in sysinit sockets paths timers slices local-fs local-fs-pre swap \
             network network-pre network-online nss-lookup nss-user-lookup \
             remote-fs remote-fs-pre time-set time-sync getty; do
        printf '[Unit]\nDescription=%s (harness stub)\n' "$t.target" > "$U/$t.target"
    done
    cat > "$U/basic.target" <<'EOF'
[Unit]
Description=Basic System (harness stub)
Requires=sysinit.target
Wants=sockets.target paths.target timers.target slices.target
After=sysinit.target sockets.target paths.target timers.target slices.target
EOF
    cat > "$U/multi-user.target" <<'EOF'
[Unit]
Description=Multi-User System (harness stub)
Requires=basic.target
After=basic.target
AllowIsolate=yes
EOF
    cat > "$U/harness.target" <<'EOF'
[Unit]
Description=systemd test harness
Requires=basic.target dbus.socket systemd-journald.socket
Wants=dbus.service systemd-journald.service
After=basic.target dbus.socket dbus.service systemd-journald.service
AllowIsolate=yes
EOF
    ln -s harness.target "$U/default.target"
    for t in dbus.socket dbus.service shutdown.target umount.target final.target \
             poweroff.target systemd-poweroff.service exit.target systemd-exit.service \
             halt.target systemd-halt.service systemd-journald.service \
             systemd-journald.socket systemd-journald-dev-log.socket; do
        ln -s "/lib/systemd/system/$t" "$U/$t"
    done
    ln -s /dev/null "$U/systemd-journald-audit.socket"     # masked: no audit netlink
    cat > "$R/systemd/system.conf.d/zz-harness.conf" <<'EOF'
[Manager]
ShowStatus=no
LogLevel=info
RuntimeWatchdogSec=0
RebootWatchdogSec=0
KExecWatchdogSec=0
CtrlAltDelBurstAction=none
DefaultTimeoutStartSec=30s
DefaultTimeoutStopSec=10s
DefaultLimitCORE=0
DefaultCPUAccounting=yes
DefaultMemoryAccounting=yes
DefaultTasksAccounting=yes
EOF
    cat > "$R/systemd/journald.conf.d/zz-harness.conf" <<'EOF'
[Journal]
Storage=volatile
ReadKMSG=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
RuntimeMaxUse=64M
EOF
    [ -n "$ROOT_DIR" ] || write_dbus_config
    if [ -n "$UNITS_DIR" ]; then cp -a "$UNITS_DIR"/. "$R/systemd/system/"; fi
}

# ------------------------------------------------------------ inside the ns
# PID 1 of the new PID namespace, private mount propagation: nothing mounted
# here is visible on the host.  Ends by exec'ing systemd.
ns_init() {
    local B=$BASE line type opts mp d
    export LIBMOUNT_UTAB=$B/stage/utab    # else libmount locks the HOST's /run/mount/utab

    # 1. cgroups: fresh mounts made inside the cgroup namespace (their root is
    #    our dedicated child) on a fresh tmpfs; the host's tmpfs is never touched
    local -a CG=()
    while read -r line; do CG+=("$line"); done < <(awk '
        { for (i = 7; i <= NF; i++) if ($i == "-") { sep = i; break }
          fstype = $(sep + 1); sopts = $(sep + 3); mp = $5
          if ((fstype == "cgroup" || fstype == "cgroup2") && index(mp, "/sys/fs/cgroup") == 1) {
              n = split(sopts, s, ","); o = ""
              for (k = 1; k <= n; k++) if (s[k] != "rw" && s[k] != "ro") o = o (o == "" ? "" : ",") s[k]
              if (o == "") o = "none"
              print fstype, o, mp } }' /proc/self/mountinfo)
    umount -R /sys/fs/cgroup 2>/dev/null || umount -R -l /sys/fs/cgroup
    mount -o remount,bind,ro /sys                      # 2. /sys read-only
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec,size=4m tmpfs /sys/fs/cgroup
    for line in "${CG[@]}"; do
        set -- $line; type=$1 opts=$2 mp=$3
        mkdir -p "$mp"
        if [ "$type" = cgroup2 ]; then
            [ "$mp" = /sys/fs/cgroup ] && umount /sys/fs/cgroup        # pure v2 host
            mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$mp"
        else
            mount -t cgroup -o "nosuid,nodev,noexec,$opts" cgroup "$mp"
        fi
    done

    # 3. kernel tunables read-only (systemd bumps fs.file-max, max_dgram_qlen...)
    for d in /proc/sys /proc/sysrq-trigger; do
        [ -e "$d" ] || continue
        mount --bind "$d" "$d"; mount -o remount,bind,ro "$d"
    done

    # 4. private /dev, built aside and moved in
    d=$B/stage/dev
    mount -t tmpfs -o mode=755,nosuid,size=8m tmpfs "$d"
    mknod -m 666 "$d/null" c 1 3;    mknod -m 666 "$d/zero" c 1 5
    mknod -m 666 "$d/full" c 1 7;    mknod -m 666 "$d/random" c 1 8
    mknod -m 666 "$d/urandom" c 1 9; mknod -m 666 "$d/tty" c 5 0
    mkdir -m 755 "$d/pts"; mkdir -m 1777 "$d/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts "$d/pts"
    ln -s pts/ptmx "$d/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$d/shm"
    ln -s /proc/self/fd "$d/fd"; ln -s /proc/self/fd/0 "$d/stdin"
    ln -s /proc/self/fd/1 "$d/stdout"; ln -s /proc/self/fd/2 "$d/stderr"
    if [ -n "$ROOT_DIR" ]; then root_switch "$d"; fi     # does not return
    mount --move "$d" /dev

    # 5. /run = $BASE/run (sockets reachable from the host by path)
    mount --bind "$B/run" /run

    # 6. throw-away overlays, shared /tmp, the rest of / read-only
    for d in $OVERLAY_PATHS; do
        [ -d "$d" ] || continue
        line=$B/overlay/$(echo "${d#/}" | tr / _)
        mkdir -p "$line/upper" "$line/work"
        mount -t overlay overlay -o "lowerdir=$d,upperdir=$line/upper,workdir=$line/work" "$d"
    done
    mount --rbind /tmp /tmp
    mount -o remount,bind,ro /

    now_ms > "$B/state/t_exec_ms"
    # 7. become systemd, with a clean explicit environment
    exec env -i \
        container=systemd-harness \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 \
        NOTIFY_SOCKET="$B/run/harness/notify.sock" \
        SYSTEMD_UNIT_PATH=/run/systemd/system.control:/run/systemd/transient:/run/systemd/system:/run/harness/units \
        SYSTEMD_GENERATOR_PATH=/run/harness/empty \
        SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/harness/empty \
        "$SYSTEMD_BIN" --system --unit=harness.target --show-status=no
}

# ROOT_DIR mode, from ns_init once the cgroups and /proc/sys are done: the new
# root gets its own /proc, the read-only /sys (with our cgroup mounts), the
# private /dev ($1, not moved yet) and /run = $BASE/run; pivot_root makes it /.
root_switch() {
    local R=$ROOT_DIR d
    mount --bind "$R" "$R"                        # pivot_root needs a mount point
    mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
    for d in /proc/sys /proc/sysrq-trigger; do
        [ -e "$R$d" ] || continue
        mount --bind "$R$d" "$R$d"; mount -o remount,bind,ro "$R$d"
    done
    mount --rbind /sys "$R/sys"; mount -o remount,bind,ro "$R/sys"
    mount --move "$1" "$R/dev"
    mount --bind "$B/run" "$R/run"
    cd "$R"
    pivot_root . .                                # the old root is stacked on top...
    umount -l .                                   # ...and goes away
    cd /
    now_ms > /run/harness/t_exec_ms
    exec env -i \
        container=systemd-harness \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 \
        NOTIFY_SOCKET=/run/harness/notify.sock \
        /lib/systemd/systemd --system --unit=multi-user.target --show-status=no
}

# ------------------------------------------------------------------- launch
# Moves itself into the dedicated cgroups, then becomes unshare, whose forked
# child runs ns_init as PID 1 (so the cgroup namespace root is the dedicated cgroup).
launch() {
    local f
    pid_starttime $$ > "$STATE/unshare.start"    # before the pid file: gc relies on it
    echo $$ > "$STATE/unshare.pid"
    while read -r f; do echo $$ > "$f/cgroup.procs"; done < "$STATE/cgroups"
    local -a ns=(--pid --fork --mount --uts --ipc --cgroup --mount-proc --propagation private)
    [ "$NETNS" = 1 ] && ns+=(--net)
    local -a pd=()
    [ "${HARNESS_TIED:-0}" = 1 ] && pd=(--pdeathsig KILL)   # dies with the runner
    exec setpriv "${pd[@]}" --bounding-set "$DROP_CAPS" \
        unshare "${ns[@]}" --kill-child=SIGKILL -- "$SELF" __ns_init
}

# ------------------------------------------------------------- state / names
load_state() {   # $1 = NAME or BASE
    case "$1" in /*) BASE=$1;; *) BASE=$HARNESS_ROOT/$1;; esac
    STATE=$BASE/state
    [ -d "$STATE" ] || die "no instance at $BASE"
    NAME=$(cat "$STATE/name")
    CG_PREFIX=$(cat "$STATE/cg_prefix" 2>/dev/null || echo "$CG_PREFIX")
    NETNS=$(cat "$STATE/netns" 2>/dev/null || echo 0)
    UNSHARE_PID=$(cat "$STATE/unshare.pid" 2>/dev/null || true)
    UNSHARE_ST=$(cat "$STATE/unshare.start" 2>/dev/null || true)
    SYSTEMD_PID=$(cat "$STATE/systemd.pid" 2>/dev/null || true)
    SYSTEMD_ST=$(cat "$STATE/systemd.start" 2>/dev/null || true)
}

bus() { DBUS_SYSTEM_BUS_ADDRESS=unix:path=$BASE/run/dbus/system_bus_socket busctl --system "$@"; }

# ---------------------------------------------------------------- commands
cmd_start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    NAME=${1:-$(printf 'i%d-%04x' $$ $RANDOM)}
    case "$NAME" in *[!A-Za-z0-9_.-]*|'') die "bad NAME '$NAME'";; esac
    [ ${#NAME} -le 40 ] || die "NAME longer than 40 characters"
    BASE=$HARNESS_ROOT/$NAME; STATE=$BASE/state
    cmd_gc >/dev/null 2>&1 || true
    [ -e "$BASE" ] && die "$BASE already exists"
    local sock=$BASE/run/harness/notify.sock
    [ ${#sock} -lt 90 ] || die "HARNESS_ROOT too long for AF_UNIX paths"
    if [ -n "$ROOT_DIR" ]; then
        local d
        export ROOT_DIR=$(readlink -f "$ROOT_DIR")
        [ -x "$ROOT_DIR/lib/systemd/systemd" ] || die "ROOT_DIR $ROOT_DIR has no /lib/systemd/systemd"
        for d in proc sys dev run; do [ -d "$ROOT_DIR/$d" ] || die "ROOT_DIR $ROOT_DIR has no /$d"; done
    fi
    mkdir -p "$STATE" "$BASE/run/harness" "$BASE/stage/dev"
    echo "$NAME" > "$STATE/name"; echo "$CG_PREFIX" > "$STATE/cg_prefix"; echo "$NETNS" > "$STATE/netns"
    # any failure below exits the script (set -e): tear down what was made
    trap 'rc=$?; if [ "${START_OK:-0}" != 1 ]; then log "start failed (rc=$rc); launch log:";
          cat "$BASE/launch.log" >&2 2>/dev/null || true; cmd_stop "$BASE" >/dev/null 2>&1 || true; fi' EXIT
    local t0; t0=$(now_ms)
    cg_create
    write_units

    # readiness: PID 1 sends READY=1 to $NOTIFY_SOCKET when harness.target is
    # reached; exit 3 early if unshare dies (a zombie counts as dead)
    "$PYTHON" - "$sock" "$BOOT_TIMEOUT" "$STATE/unshare.pid" <<'PY' &
import os, socket, sys, time
path, timeout, pidfile = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path + ".tmp"); os.rename(path + ".tmp", path)
s.settimeout(0.1)
end = time.monotonic() + timeout
while time.monotonic() < end:
    try:
        msg = s.recv(4096).decode(errors="replace")
    except socket.timeout:
        try:
            pid = int(open(pidfile).read())
        except (FileNotFoundError, ValueError):
            continue
        try:
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            st = "X"
        if st in "ZX":
            sys.exit(3)
        continue
    if "READY=1" in msg.split("\n"):
        sys.exit(0)
sys.exit(2)
PY
    local waiter=$!
    while [ ! -S "$sock" ]; do
        pid_alive "$waiter" || die "readiness listener failed to start ($PYTHON)"
        sleep 0.005
    done
    local t1; t1=$(now_ms)
    if [ "${HARNESS_TIED:-0}" = 1 ]; then
        "$SELF" __launch "$BASE" < /dev/null > "$BASE/launch.log" 2>&1 &        # our child
    else
        setsid "$SELF" __launch "$BASE" < /dev/null > "$BASE/launch.log" 2>&1 &  # detached
    fi
    local rc=0; wait "$waiter" || rc=$?
    local t2; t2=$(now_ms)
    while [ ! -s "$STATE/unshare.pid" ]; do sleep 0.01; done
    UNSHARE_PID=$(cat "$STATE/unshare.pid")
    SYSTEMD_PID=$( { cat "/proc/$UNSHARE_PID/task/$UNSHARE_PID/children" 2>/dev/null || true; } | awk '{print $1}')
    if [ -n "$SYSTEMD_PID" ]; then
        echo "$SYSTEMD_PID" > "$STATE/systemd.pid"
        pid_starttime "$SYSTEMD_PID" > "$STATE/systemd.start" || true
    fi
    case $rc in
        0) ;;
        2) die "no READY=1 from systemd within BOOT_TIMEOUT=${BOOT_TIMEOUT}s";;
        3) die "the namespace died during boot";;
        *) die "readiness listener failed (rc=$rc)";;
    esac
    # the default target active, and systemd reachable over the bus from the host
    local st="" i target=harness_2etarget
    [ -n "$ROOT_DIR" ] && target=multi_2duser_2etarget
    for i in $(seq 1 200); do
        st=$(bus get-property org.freedesktop.systemd1 /org/freedesktop/systemd1/unit/$target \
                 org.freedesktop.systemd1.Unit ActiveState 2>/dev/null || true)
        [ "$st" = 's "active"' ] && break
        sleep 0.01
    done
    [ "$st" = 's "active"' ] || die "default target ($target) not active: $st"
    START_OK=1; trap - EXIT
    local t3 tx; t3=$(now_ms); tx=$(cat "$STATE/t_exec_ms" "$BASE/run/harness/t_exec_ms" 2>/dev/null || true)
    tx=${tx:-$t1}
    cat <<EOF
NAME=$NAME
BASE=$BASE
SYSTEMD_PID=$SYSTEMD_PID
UNSHARE_PID=$UNSHARE_PID
NETNS=$NETNS
RUN_DIR=$BASE/run
DBUS_SYSTEM_BUS_ADDRESS=unix:path=$BASE/run/dbus/system_bus_socket
JOURNAL_DIR=$BASE/run/log/journal
CGROUP_MODE=$(cgroup_mode)
MEMCG_DIR=$(cat "$STATE/memcg")
CGROUPS=$(paste -sd: "$STATE/cgroups")
BOOT_MS=$(( t3 - t0 ))
BOOT_BREAKDOWN_MS=prep:$(( t1 - t0 )),ns_setup:$(( tx - t1 )),systemd:$(( t2 - tx )),bus_check:$(( t3 - t2 ))
EOF
}

cmd_stop() {
    load_state "$1"
    exec 8< "$BASE"; flock 8          # serialise with a concurrent stop/gc
    [ -d "$STATE" ] || { echo "STOP_MS=0"; return 0; }
    local t0 i; t0=$(now_ms)
    if pid_is "$SYSTEMD_PID" "$SYSTEMD_ST"; then
        kill -s SIGRTMIN+4 "$SYSTEMD_PID" 2>/dev/null || true   # start poweroff.target
        for i in $(seq 1 $(( STOP_TIMEOUT * 50 ))); do
            pid_is "$SYSTEMD_PID" "$SYSTEMD_ST" || break; sleep 0.02
        done
        if pid_is "$SYSTEMD_PID" "$SYSTEMD_ST"; then
            log "graceful poweroff timed out; SIGKILL to the namespace's PID 1"
            kill -KILL "$SYSTEMD_PID" 2>/dev/null || true       # kills the whole PID ns
        fi
    fi
    for i in $(seq 1 250); do pid_is "$UNSHARE_PID" "$UNSHARE_ST" || break; sleep 0.02; done
    if pid_is "$UNSHARE_PID" "$UNSHARE_ST"; then kill -KILL "$UNSHARE_PID" 2>/dev/null || true; sleep 0.05; fi
    cg_remove || true
    # the reader of our stdout may be gone (run mode, killed test runner)
    echo "STOP_MS=$(( $(now_ms) - t0 ))" 2>/dev/null || true
    # all mounts were made in the private mount namespace; check before rm -rf anyway
    if grep -q " ${BASE}[/ ]" /proc/self/mountinfo; then die "mounts below $BASE on the host?!"; fi
    rm -rf --one-file-system "$BASE"
}

cmd_exec() {
    load_state "$1"; shift
    [ "${1:-}" = -- ] && shift
    pid_is "$SYSTEMD_PID" "$SYSTEMD_ST" || die "instance $NAME is not running"
    local -a n=(-m -p -u -i -C)
    [ "$NETNS" = 1 ] && n+=(-n)
    exec env DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/dbus/system_bus_socket \
        nsenter -t "$SYSTEMD_PID" "${n[@]}" -- "$@"
}

cmd_logs() {
    load_state "$1"; shift
    exec journalctl -D "$BASE/run/log/journal" --no-pager "$@"
}

cmd_gc() {   # instances whose unshare is gone: remove cgroups + dir
    local d
    for d in "$HARNESS_ROOT"/*/state; do
        [ -d "$d" ] || continue
        ( load_state "$(dirname "$d")"
          exec 8< "$BASE"; flock -n 8 || exit 0          # being stopped right now
          if [ -n "$UNSHARE_PID" ]; then
              pid_is "$UNSHARE_PID" "$UNSHARE_ST" && exit 0   # running or booting
          else
              # not launched yet: a start in progress, unless it is old
              [ $(( $(date +%s) - $(stat -c %Y "$STATE") )) -gt 120 ] || exit 0
          fi
          flock -u 8
          log "gc: removing dead instance $BASE"; cmd_stop "$BASE" >/dev/null ) || true
    done
}

cmd_run() {
    export HARNESS_TIED=1
    cmd_start "$@"
    local n=$NAME
    trap '' PIPE     # a dead reader must not kill us before the cleanup is done
    trap 'cmd_stop "$HARNESS_ROOT/$n"; exit 0' TERM INT HUP
    while read -r _; do :; done        # EOF: the test runner closed the pipe, or died
    cmd_stop "$HARNESS_ROOT/$n"
}

case "${1:-}" in
    start) shift; cmd_start "$@";;
    run)   shift; cmd_run "$@";;
    stop)  shift; [ $# = 1 ] || die "usage: stop NAME|BASE"; cmd_stop "$1";;
    exec)  shift; cmd_exec "$@";;
    logs)  shift; cmd_logs "$@";;
    gc)    cmd_gc;;
    __launch)  export BASE=$2; STATE=$BASE/state; NAME=$(cat "$STATE/name"); NETNS=$(cat "$STATE/netns"); launch;;
    __ns_init) ns_init;;
    *) sed -n '2,14p' "$SELF" >&2; exit 2;;
esac
