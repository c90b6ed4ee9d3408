# shellcheck shell=bash disable=SC2034  # constants used by the scripts that source this
# Shared settings and helpers for the sandbox scripts. Sourced, never run.
#
# The sandbox is one systemd-nspawn container (a Debian bookworm host with systemd, sshd and
# a stand-in for the resident Flux service) on a veth pair, plus a moto S3 server bound to the
# host side of that veth. Everything it creates lives under $SANDBOX_STATE (.sandbox/ in the
# repository), the rootfs and wheel caches under $SANDBOX_CACHE.

SANDBOX_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SANDBOX_LIB/../.." && pwd)"

# Bump when the rootfs recipe (build-rootfs) changes; the cached tarball is keyed by it.
# Files under guest/ are copied in at every boot and need no bump.
ROOTFS_VERSION="bookworm-6"

SANDBOX_CACHE="${MODEL_DEPLOYER_CACHE:-${HOME:-/root}/.cache/model-deployer}"
ROOTFS_TAR="$SANDBOX_CACHE/rootfs-$ROOTFS_VERSION.tar.zst"
# The tarball unpacked once: the read-only lower layer of every boot's overlay.
ROOTFS_BASE="$SANDBOX_CACHE/rootfs-$ROOTFS_VERSION"
SANDBOX_STATE="$REPO_ROOT/.sandbox"

MACHINE="mdsandbox"
VETH_HOST="ve-$MACHINE"
HOST_SIDE_ADDR="10.77.0.1"
GUEST_ADDR="10.77.0.2"
NET_PREFIX=24
S3_PORT=9000
S3_BUCKET="asoba-llm-cache"
S3_REGION="us-west-2"
GUEST_USER="ubuntu"

# The CPU build of PyTorch that plays the GPU host's preinstalled CUDA torch.
TORCH_WHEEL="${SANDBOX_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"

# The guest is CPython 3.11 on glibc 2.36 (bookworm), x86_64.
GUEST_PIP_PLATFORM_ARGS=(
    --only-binary=:all:
    --implementation cp
    --python-version 3.11
    --abi cp311
    --abi abi3
    --abi none
    # pip does not widen an explicit --platform to older glibc tags: name each one.
    $(for minor in $(seq 36 -1 17); do printf -- '--platform manylinux_2_%s_x86_64 ' "$minor"; done)
    --platform manylinux2014_x86_64
    --platform any
)

# Seconds since the EPOCHREALTIME value $1, one decimal.
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

log() { printf '[sandbox] %s\n' "$*" >&2; }
die() { printf '[sandbox] error: %s\n' "$*" >&2; exit 1; }

require_root() {
    [[ "$(id -u)" -eq 0 ]] || die "must run as root (systemd-nspawn, veth and cgroups need it)"
}

# Install Debian packages that are missing; quiet and idempotent.
ensure_apt_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The first Debian (non-security) mirror in this machine's apt sources.
apt_mirror() {
    local uri=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uri="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
            /etc/apt/sources.list.d/debian.sources)"
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
            /etc/apt/sources.list)"
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# True when PIDFILE names a live process whose command name is COMM.
pid_alive() {
    local pidfile="$1" comm="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/comm" ]] || return 1
    [[ "$(<"/proc/$pid/comm")" == "$comm"* ]]
}

# The Python that runs the sandbox's own tooling (moto, boto3): the project venv.
sandbox_python() {
    local py="${SANDBOX_PYTHON:-$REPO_ROOT/.venv/bin/python}"
    [[ -x "$py" ]] || die "no project venv at $py (create it and install the dev extra first)"
    printf '%s\n' "$py"
}

# This process's cgroup directory in every mounted hierarchy (cgroup v1 controllers, the
# name=systemd one and the unified v2 one), one per line.
own_cgroup_dirs() {
    local _dev mnt fstype opts _rest ctrls path
    while read -r _dev mnt fstype opts _rest; do
        path=""
        case "$fstype" in
            cgroup2) path="$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup)" ;;
            cgroup)
                while IFS=: read -r _ ctrls p; do
                    if [[ -n "$ctrls" && ",$opts," == *",${ctrls%%,*},"* ]]; then
                        path="$p"
                        break
                    fi
                done </proc/self/cgroup
                ;;
            *) continue ;;
        esac
        printf '%s%s\n' "$mnt" "${path%/}"
    done </proc/self/mounts
}

# Create a child cgroup NAME under this process's cgroup in every hierarchy and append the
# created directories to RECORD, so that remove_cgroups can take exactly those away again.
make_cgroups() {
    local name="$1" record="$2" parent dir f
    while read -r parent; do
        dir="$parent/$name"
        mkdir -p "$dir"
        # A v1 cpuset child starts with no CPUs and no memory nodes; inherit the parent's.
        for f in cpuset.cpus cpuset.mems; do
            if [[ -f "$dir/$f" && -z "$(<"$dir/$f")" ]]; then
                cat "$parent/$f" >"$dir/$f"
            fi
        done
        printf '%s\n' "$dir" >>"$record"
    done < <(own_cgroup_dirs)
}

# Move PID into every cgroup listed in RECORD.
attach_cgroups() {
    local pid="$1" record="$2" dir
    while read -r dir; do
        printf '%s\n' "$pid" >"$dir/cgroup.procs"
    done <"$record"
}

# Remove the cgroups listed in RECORD (and whatever the guest's systemd made below them).
# Processes still inside are killed by pid: they can only be the sandbox's own.
remove_cgroups() {
    local record="$1" dir pid deadline
    [[ -f "$record" ]] || return 0
    deadline=$((SECONDS + 10))
    while read -r dir; do
        [[ -d "$dir" ]] || continue
        while read -r pid; do
            kill -KILL "$pid" 2>/dev/null || true
        done < <(find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null)
        until find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null; do
            ((SECONDS < deadline)) || { log "could not remove cgroup $dir"; break; }
            sleep 0.2
        done
    done <"$record"
    rm -f "$record"
}

# Run a command in throwaway child cgroups of every hierarchy, removed afterwards
# (a non-booting systemd-nspawn creates cgroups next to itself and leaves them behind).
run_in_scratch_cgroups() {
    local name="$1" record rc=0
    shift
    record="$(mktemp)"
    make_cgroups "$name" "$record"
    (attach_cgroups "$BASHPID" "$record" && exec "$@") || rc=$?
    remove_cgroups "$record"
    rm -rf "/run/systemd/nspawn/propagate/$name"
    return "$rc"
}
