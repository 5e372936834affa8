#!/usr/bin/env bash
# Everything a kind cluster needs, made on a machine with no container registry.
#
#   hack/kind-offline.sh engine   Debian packages, then a dockerd of our own in its own
#                                 network namespace (idempotent: reuses a running one)
#   hack/kind-offline.sh images   build (or find cached) every image kind and the tests need
#   hack/kind-offline.sh fetch    only the network part of `images` (debootstrap)
#   hack/kind-offline.sh stop     stop that dockerd, remove its network namespace and veth
#   hack/kind-offline.sh status   say whether the engine runs
#
# hack/kind-up.sh calls it when no usable container engine with a registry is
# there; hack/kind-down.sh calls `stop`. Source hack/kind-lib.sh to talk to the
# engine (it exports DOCKER_HOST and runs kubectl inside the namespace).
#
# Why each part (facts from this project's machine: Debian 12, cgroup v1, no registry):
# * The engine: Debian's docker.io (20.10), containerd, runc. Its dockerd runs inside
#   the network namespace $KIND_NETNS (a veth to the host whose host end has no
#   route), with its own socket, exec root and data root, so it never touches the
#   host's iptables, FORWARD policy, ip_forward or routes: the kernel and integration
#   test tiers share the host's netfilter state. Everything that talks to the cluster
#   (kubectl, e2e.test) runs inside the namespace, where the API server's port is
#   published.
# * The runc wrapper (hack/kind/runc-capbnd.py) is the default runtime only when the
#   capability bounding set lacks a capability (privileged containers fail otherwise).
# * Images, none pulled: kind's base image from a debootstrap rootfs plus kind's own
#   images/base/files (from the kind module in the Go module cache); the node image
#   from it plus kubelet/kubeadm/kubectl and, imported into its containerd, every
#   image kubeadm v1.34.4 asks for (control-plane binaries from
#   hack/build-control-plane.sh, etcd, coredns built with go install, pause compiled
#   from Kubernetes' pause.c), the pod-network fixture (hack/kind/podnet.py) and
#   agnhost. Static binaries become images through `docker import` of a tiny rootfs.
#   The pyproxy image is built from the project's Dockerfile on a local Python base
#   (debootstrap + wheels prepared on the host): nothing in any build needs network.
#
# Cache (outside the repo, reused across runs): ${PYPROXY_CACHE:-~/.cache/pyproxy}/kind/
#   bin/ (kind, crictl, coredns, pause), rootfs/ (debootstrap tarballs), wheels/,
#   docker/ (the engine's data root: built images survive `stop`). Remove it with rm -rf.
# Progress lines carry the time each step took.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=hack/kind-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kind-lib.sh"

KIND_VERSION=v0.33.0
K8S_VERSION=v1.34.4
CRICTL_VERSION=v1.34.0
COREDNS_VERSION=v1.12.1
# kubeadm v1.34.4's `config images list`: etcd 3.6.5-0 (served by the etcd v3.6.16 that
# hack/build-control-plane.sh builds), pause 3.10.1, coredns v1.12.1. kind's containerd
# config names pause 3.10 as its sandbox image: both tags point at the same image.
ETCD_IMAGE_TAG=3.6.5-0
PAUSE_TAGS=(3.10.1 3.10)
# test/utils/image/manifest.go of v1.34.4.
AGNHOST_TAG=2.56
NODE_IMAGE="pyproxy-kind/node:$K8S_VERSION"
BASE_IMAGE="pyproxy-kind/base:$KIND_VERSION"
PYTHON_IMAGE="pyproxy-kind/python:3.11-offline"
PODNET_IMAGE="pyproxy-kind/podnet:v1"

CP_CACHE="$PYPROXY_CACHE/control-plane"
GO_ENV=(GOMODCACHE="$CP_CACHE/go/mod" GOCACHE="$CP_CACHE/go/build" GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-modcacherw)
KIND_MODULE="$CP_CACHE/go/mod/sigs.k8s.io/kind@$KIND_VERSION"
# The Debian packages of the two debootstrap bases: kind's node base (kind's list, with
# Debian's containerd, runc and CNI plugins), and the tools base of every other image.
KINDBASE_PACKAGES=systemd,systemd-sysv,dbus,containerd,runc,containernetworking-plugins,nftables,iptables,conntrack,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,jq,e2fsprogs,socat,ca-certificates,curl,procps,bash
TOOLS_PACKAGES=python3,python3-pip,iptables,ipset,conntrack,iproute2,ipvsadm,kmod,nftables,curl,wget,netcat-openbsd,ca-certificates,procps,dnsutils
# Cache keys: a changed package list makes a new root filesystem and images.
TOOLS_KEY=$(printf '%s' "$TOOLS_PACKAGES" | sha256sum | cut -c1-8)
KINDBASE_KEY=$(printf '%s' "$KINDBASE_PACKAGES" | sha256sum | cut -c1-8)
TOOLS_IMAGE="pyproxy-kind/tools:bookworm-$TOOLS_KEY"
DEBIAN_PACKAGES=(docker.io containerd runc containernetworking-plugins debootstrap gcc libc6-dev iproute2)

# step NAME CMD...: run a build step with a progress line and its duration.
step() {
    local name=$1 t
    shift
    t=$(now)
    log "kind-offline: $name ..."
    "$@"
    log "kind-offline: $name done in $(elapsed "$t") s"
}

find_go() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [[ -x /usr/local/go/bin/go ]]; then
        echo /usr/local/go/bin/go
    else
        die "no Go toolchain found (looked in PATH and /usr/local/go/bin)"
    fi
}

# --- engine --------------------------------------------------------------------------

engine_running() {
    [[ -S "$KIND_DOCKER_SOCK" ]] && DOCKER_HOST="unix://$KIND_DOCKER_SOCK" /usr/bin/docker info >/dev/null 2>&1
}

# capbnd_complete: true when the bounding set holds every capability the kernel knows.
capbnd_complete() {
    local bnd last
    bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
    last=$(cat /proc/sys/kernel/cap_last_cap)
    [[ "$((16#$bnd))" == "$(((1 << (last + 1)) - 1))" ]]
}

engine_start() {
    apt_install "${DEBIAN_PACKAGES[@]}"
    if engine_running; then
        log "kind-offline: engine already answers on $KIND_DOCKER_SOCK"
        return
    fi
    mkdir -p "$KIND_RUN" "$KIND_CACHE/docker"
    if ! ip netns list | grep -qw "$KIND_NETNS"; then
        ip netns add "$KIND_NETNS"
    fi
    ip -n "$KIND_NETNS" link set lo up
    if ! ip link show "$KIND_VETH_HOST" >/dev/null 2>&1; then
        ip link add "$KIND_VETH_HOST" type veth peer name eth0 netns "$KIND_NETNS"
        # noprefixroute: the host gets the link, not a route (the host's routes stay as
        # they are). The namespace routes through it by default; nothing is forwarded or
        # masqueraded on the host, so no traffic leaves the namespace except to this link.
        ip addr add 169.254.77.1/30 dev "$KIND_VETH_HOST" noprefixroute
        ip link set "$KIND_VETH_HOST" up
        ip -n "$KIND_NETNS" addr add 169.254.77.2/30 dev eth0
        ip -n "$KIND_NETNS" link set eth0 up
        ip -n "$KIND_NETNS" route add default via 169.254.77.1
    fi
    local args=(
        --host "unix://$KIND_DOCKER_SOCK"
        --data-root "$KIND_CACHE/docker"
        --exec-root "$KIND_RUN/exec"
        --pidfile "$KIND_RUN/dockerd.pid"
        --storage-driver overlay2
        --exec-opt native.cgroupdriver=cgroupfs
        # Not in the host's /docker cgroup, should another engine run there.
        --cgroup-parent pyproxy-kind
    )
    if capbnd_complete; then
        log "kind-offline: the capability bounding set is complete: plain runc"
    else
        log "kind-offline: CapBnd $(awk '/^CapBnd:/ {print $2}' /proc/self/status) lacks capabilities: runc wrapper $KIND_RUN/runc-capbnd"
        install -m 0755 "$REPO_ROOT/hack/kind/runc-capbnd.py" "$KIND_RUN/runc-capbnd"
        args+=(--add-runtime "runc-capbnd=$KIND_RUN/runc-capbnd" --default-runtime runc-capbnd)
    fi
    log "kind-offline: starting dockerd in network namespace $KIND_NETNS (log $KIND_RUN/dockerd.log)"
    # setsid: the engine outlives this script; its own session, so a terminal's signals miss it.
    setsid nsenter --net="/run/netns/$KIND_NETNS" /usr/sbin/dockerd "${args[@]}" >"$KIND_RUN/dockerd.log" 2>&1 </dev/null &
    local pid=$! i
    for i in $(seq 120); do
        engine_running && break
        if [[ "$i" == 120 ]] || ! kill -0 "$pid" 2>/dev/null; then
            tail -20 "$KIND_RUN/dockerd.log" >&2
            die "dockerd did not come up (log above)"
        fi
        sleep 1
    done
    log "kind-offline: engine answers: $(/usr/bin/docker --host "unix://$KIND_DOCKER_SOCK" version --format '{{.Server.Version}}')"
}

engine_stop() {
    local pid
    if [[ -f "$KIND_RUN/dockerd.pid" ]]; then
        pid=$(cat "$KIND_RUN/dockerd.pid")
        if kill -0 "$pid" 2>/dev/null; then
            log "kind-offline: stopping dockerd (pid $pid)"
            kill "$pid"
            for _ in $(seq 60); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 1
            done
            kill -0 "$pid" 2>/dev/null && die "dockerd (pid $pid) still runs after 60 s"
        fi
    fi
    if ip link show "$KIND_VETH_HOST" >/dev/null 2>&1; then
        ip link del "$KIND_VETH_HOST"
    fi
    if ip netns list | grep -qw "$KIND_NETNS"; then
        ip netns del "$KIND_NETNS"
    fi
    rm -rf "$KIND_RUN"
    log "kind-offline: engine stopped, namespace $KIND_NETNS removed (cache kept in $KIND_CACHE)"
}

# --- builds --------------------------------------------------------------------------

docker() { /usr/bin/docker --host "unix://$KIND_DOCKER_SOCK" "$@"; }

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# go_install PKG@VERSION BINARY: `go install` into the cache's bin/ unless there.
go_install() {
    local target=$1 binary=$2
    [[ -x "$KIND_CACHE/bin/$binary" ]] && return
    mkdir -p "$KIND_CACHE/bin"
    env "${GO_ENV[@]}" GOBIN="$KIND_CACHE/bin" "$GO" install -trimpath -ldflags=-s\ -w "$target"
}

# debian_mirror: the Debian archive URL apt is configured with (debootstrap must use
# that mirror and no other).
debian_mirror() {
    local url
    url=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ {u = $2} /^Suites:/ && / bookworm( |$)/ && u != "" {print u; exit}')
    if [[ -z "$url" ]]; then
        url=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    [[ -n "$url" ]] || die "no bookworm mirror in /etc/apt/sources.list*"
    echo "$url"
}

# rootfs NAME PACKAGES: a debootstrap (minbase) tarball of bookworm with PACKAGES, cached.
rootfs() {
    local name=$1 packages=$2 tarball="$KIND_CACHE/rootfs/$1.tar" dir
    [[ -f "$tarball" ]] && return
    mkdir -p "$KIND_CACHE/rootfs"
    dir=$(mktemp -d "$KIND_CACHE/rootfs/$name.XXXXXX")
    debootstrap --variant=minbase --include="$packages" bookworm "$dir" "$(debian_mirror)" >"$dir.log" 2>&1 ||
        { tail -20 "$dir.log" >&2; die "debootstrap of $name failed (log $dir.log)"; }
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb
    tar -C "$dir" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$dir" "$dir.log"
}

# tiny_image NAME ENTRYPOINT_JSON FILE...: an image of the static binaries FILE... in
# /usr/local/bin (plus the few /etc files Go programs read), made with docker import.
tiny_image() {
    local name=$1 entrypoint=$2 dir f
    shift 2
    have_image "$name" && return
    dir=$(mktemp -d)
    mkdir -p "$dir/usr/local/bin" "$dir/etc/ssl/certs" "$dir/tmp" "$dir/var/run"
    chmod 1777 "$dir/tmp"
    for f in "$@"; do cp -L "$f" "$dir/usr/local/bin/"; done
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' >"$dir/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' >"$dir/etc/group"
    printf 'hosts: files dns\n' >"$dir/etc/nsswitch.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
    tar -C "$dir" -c . | docker import \
        -c "ENV PATH=/usr/local/bin:/usr/bin:/bin" -c "ENTRYPOINT $entrypoint" - "$name" >/dev/null
    rm -rf "$dir"
}

# tag_image SRC DST...: extra names for one image.
tag_image() {
    local src=$1 dst
    shift
    for dst in "$@"; do docker tag "$src" "$dst"; done
}

# docker_build TAG DIR: build DIR's Dockerfile with BuildKit and no network.
docker_build() {
    DOCKER_BUILDKIT=1 docker build --network none -q -t "$1" "$2" >/dev/null
}

build_go_tools() {
    go_install "sigs.k8s.io/kind@$KIND_VERSION" kind
    go_install "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" crictl
    go_install "github.com/coredns/coredns@$COREDNS_VERSION" coredns
}

build_kubernetes_node_binaries() {
    "$REPO_ROOT/hack/build-control-plane.sh" --with-node >/dev/null
}

build_pause() {
    [[ -x "$KIND_CACHE/bin/pause" ]] && return
    local src="$CP_CACHE/go/mod/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
    [[ -f "$src" ]] || die "$src missing (hack/build-control-plane.sh downloads k8s.io/kubernetes)"
    gcc -Os -Wall -Werror -static -DVERSION="v3.10.1-pyproxy" -o "$KIND_CACHE/bin/pause" "$src"
}

build_tools_image() {
    # One Debian base for everything that needs more than a static binary: the pyproxy
    # image (python3, pip and the node tools the Dockerfile would otherwise apt-get),
    # agnhost (whose tests exec sh, curl, wget and nc in it) and the pod network.
    rootfs "tools-$TOOLS_KEY" "$TOOLS_PACKAGES"
    have_image "$TOOLS_IMAGE" && return
    docker import -c "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "$KIND_CACHE/rootfs/tools-$TOOLS_KEY.tar" "$TOOLS_IMAGE" >/dev/null
}

build_python_image() {
    # The wheels pyproxy's image needs (its build backend and its dependencies),
    # downloaded on the host; the image installs from them with the index off.
    local wheels="$KIND_CACHE/wheels" ctx stamp
    stamp=$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-12)-$TOOLS_KEY
    if [[ ! -f "$wheels/.stamp-$stamp" ]]; then
        rm -rf "$wheels"
        mkdir -p "$wheels"
        local deps
        mapfile -t deps < <("$VENV/bin/python" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$REPO_ROOT/pyproject.toml")
        "$VENV/bin/python" -m pip download -q --only-binary=:all: --python-version 3.11 \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_28_x86_64 --implementation cp -d "$wheels" \
            "setuptools>=77" wheel "${deps[@]}"
        touch "$wheels/.stamp-$stamp"
    fi
    have_image "$PYTHON_IMAGE-$stamp" && { tag_image "$PYTHON_IMAGE-$stamp" "$PYTHON_IMAGE"; return; }
    ctx=$(mktemp -d)
    cp -r "$wheels" "$ctx/wheels"
    cat >"$ctx/Dockerfile" <<EOF
FROM $TOOLS_IMAGE
COPY wheels /wheels
# pip reads these: install from /wheels only, and into Debian's Python (this image is
# a stand-in for python:3.11-slim-bookworm, whose Python is not Debian-managed).
ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore
EOF
    docker_build "$PYTHON_IMAGE-$stamp" "$ctx"
    tag_image "$PYTHON_IMAGE-$stamp" "$PYTHON_IMAGE"
    rm -rf "$ctx"
}

build_test_images() {
    local ctx
    if ! have_image "registry.k8s.io/e2e-test-images/agnhost:$AGNHOST_TAG"; then
        ctx=$(mktemp -d)
        cp "$CP_BIN/agnhost" "$ctx/agnhost"
        printf 'FROM %s\nCOPY agnhost /agnhost\nENTRYPOINT ["/agnhost"]\n' "$TOOLS_IMAGE" >"$ctx/Dockerfile"
        docker_build "registry.k8s.io/e2e-test-images/agnhost:$AGNHOST_TAG" "$ctx"
        rm -rf "$ctx"
    fi
    if ! have_image "$PODNET_IMAGE"; then
        ctx=$(mktemp -d)
        cp "$REPO_ROOT/hack/kind/podnet.py" "$ctx/podnet.py"
        printf 'FROM %s\nCOPY podnet.py /podnet.py\nENTRYPOINT ["/usr/bin/python3", "/podnet.py"]\n' "$TOOLS_IMAGE" >"$ctx/Dockerfile"
        docker_build "$PODNET_IMAGE" "$ctx"
        rm -rf "$ctx"
    fi
}

build_component_images() {
    local b ctx
    for b in kube-apiserver kube-controller-manager kube-scheduler; do
        tiny_image "registry.k8s.io/$b:$K8S_VERSION" "[\"/usr/local/bin/$b\"]" "$CP_BIN/$b"
    done
    # kube-proxy (the control in upstream e2e runs) drives iptables and conntrack:
    # it gets the tools base, whose iptables is Debian's nft variant, as the nodes'.
    if ! have_image "registry.k8s.io/kube-proxy:$K8S_VERSION"; then
        ctx=$(mktemp -d)
        cp "$CP_BIN/kube-proxy" "$ctx/kube-proxy"
        printf 'FROM %s\nCOPY kube-proxy /usr/local/bin/kube-proxy\nENTRYPOINT ["/usr/local/bin/kube-proxy"]\n' "$TOOLS_IMAGE" >"$ctx/Dockerfile"
        docker_build "registry.k8s.io/kube-proxy:$K8S_VERSION" "$ctx"
        rm -rf "$ctx"
    fi
    tiny_image "registry.k8s.io/etcd:$ETCD_IMAGE_TAG" '["/usr/local/bin/etcd"]' "$CP_BIN/etcd"
    # kubeadm's CoreDNS Deployment gives only args: the image's entrypoint runs it.
    tiny_image "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" '["/usr/local/bin/coredns"]' "$KIND_CACHE/bin/coredns"
    tiny_image "registry.k8s.io/pause:${PAUSE_TAGS[0]}" '["/usr/local/bin/pause"]' "$KIND_CACHE/bin/pause"
    tag_image "registry.k8s.io/pause:${PAUSE_TAGS[0]}" "${PAUSE_TAGS[@]/#/registry.k8s.io/pause:}"
}

build_base_image() {
    have_image "$BASE_IMAGE" && return
    rootfs "kindbase-$KINDBASE_KEY" "$KINDBASE_PACKAGES"
    local dir files="$KIND_MODULE/images/base/files"
    [[ -d "$files" ]] || die "$files missing (the kind module is downloaded by go install)"
    dir=$(mktemp -d "$KIND_CACHE/rootfs/kindbase-work.XXXXXX")
    tar -C "$dir" -xf "$KIND_CACHE/rootfs/kindbase-$KINDBASE_KEY.tar"
    # What kind's images/base/Dockerfile does, with Debian's containerd, runc and CNI
    # plugins in place of the ones it clones and builds.
    cp -r "$files/usr/local/bin/." "$dir/usr/local/bin/"
    chmod 0755 "$dir"/usr/local/bin/*
    mkdir -p "$dir/kind" "$dir/LICENSES" "$dir/etc/kubernetes/manifests" "$dir/opt/cni"
    cp -r "$files/kind/." "$dir/kind/"
    chmod 0755 "$dir/kind" "$dir/kind/bin" "$dir"/kind/bin/*
    cp -r "$files/etc/." "$dir/etc/"
    # No fuse-overlayfs snapshotter in this image (it exists for rootless engines).
    sed -i '/^\[proxy_plugins\]/,/^  address = /d' "$dir/etc/containerd/config.toml"
    rm -f "$dir/etc/systemd/system/containerd-fuse-overlayfs.service"
    if ! capbnd_complete; then
        # Without CAP_SYS_RESOURCE, pod sandboxes fail writing /proc/self/oom_score_adj
        # below containerd's own; this makes containerd keep it (kind's entrypoint does
        # the same for rootless engines). The kubelet then logs harmless
        # "Failed to ApplyOOMScoreAdj" warnings.
        sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$dir/etc/containerd/config.toml"
    fi
    ln -sfn /usr/lib/cni "$dir/opt/cni/bin"
    ln -sfn /usr/bin/containerd "$dir/usr/local/bin/containerd"
    cp "$KIND_CACHE/bin/crictl" "$dir/usr/local/bin/crictl"
    chroot "$dir" sh -c 'ctr oci spec' |
        jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' |
        jq 'del(.process.rlimits)' >"$dir/etc/containerd/cri-base.json"
    find "$dir/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete
    rm -f "$dir"/lib/systemd/system/multi-user.target.wants/* "$dir"/etc/systemd/system/*.wants/* \
        "$dir"/lib/systemd/system/local-fs.target.wants/* "$dir"/lib/systemd/system/sockets.target.wants/*udev* \
        "$dir"/lib/systemd/system/sockets.target.wants/*initctl* "$dir"/lib/systemd/system/basic.target.wants/*
    echo "ReadKMsg=no" >>"$dir/etc/systemd/journald.conf"
    chroot "$dir" systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
    chroot "$dir" systemctl mask systemd-binfmt.service >/dev/null 2>&1
    tar -C "$dir" -c . | docker import - "$BASE_IMAGE-rootfs" >/dev/null
    rm -rf "$dir"
    # docker import cannot set STOPSIGNAL: a one-line build on top does.
    dir=$(mktemp -d)
    printf '%s\n' "FROM $BASE_IMAGE-rootfs" 'ENV container=docker' 'STOPSIGNAL SIGRTMIN+3' \
        'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' >"$dir/Dockerfile"
    docker_build "$BASE_IMAGE" "$dir"
    rm -rf "$dir"
    docker rmi "$BASE_IMAGE-rootfs" >/dev/null
}

# The images imported into the node's containerd: what kubeadm pulls, the pod
# network, and the test server.
node_images() {
    local b
    for b in kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do
        echo "registry.k8s.io/$b:$K8S_VERSION"
    done
    echo "registry.k8s.io/etcd:$ETCD_IMAGE_TAG"
    echo "registry.k8s.io/coredns/coredns:$COREDNS_VERSION"
    printf 'registry.k8s.io/pause:%s\n' "${PAUSE_TAGS[@]}"
    echo "$PODNET_IMAGE"
    echo "registry.k8s.io/e2e-test-images/agnhost:$AGNHOST_TAG"
}

build_node_image() {
    # The node image is rebuilt when any input image changed (its ID is in the label).
    local inputs id current images
    mapfile -t images < <(node_images)
    inputs=$( { docker image inspect --format '{{.Id}}' "$BASE_IMAGE" "${images[@]}"; cat "$REPO_ROOT"/hack/kind/{podnet,default-storage}.yaml; } | sha256sum | cut -c1-16)
    current=$(docker image inspect --format '{{index .Config.Labels "pyproxy.inputs"}}' "$NODE_IMAGE" 2>/dev/null || true)
    [[ "$current" == "$inputs" ]] && return
    log "kind-offline: node image inputs changed ($current -> $inputs): rebuilding $NODE_IMAGE"
    id=$(docker run -d --privileged --entrypoint=sleep "$BASE_IMAGE" infinity)
    # shellcheck disable=SC2064  # expand id now
    trap "/usr/bin/docker --host unix://$KIND_DOCKER_SOCK rm -f $id >/dev/null 2>&1 || true" RETURN
    local b
    for b in kubelet kubeadm kubectl; do
        docker cp "$CP_BIN/$b" "$id:/usr/bin/$b"
    done
    docker exec "$id" sh -c "mkdir -p /kind/manifests && echo $K8S_VERSION > /kind/version"
    docker cp "$REPO_ROOT/hack/kind/podnet.yaml" "$id:/kind/manifests/default-cni.yaml"
    docker cp "$REPO_ROOT/hack/kind/default-storage.yaml" "$id:/kind/manifests/default-storage.yaml"
    docker exec -d "$id" sh -c 'containerd >/var/log/containerd-build.log 2>&1'
    for _ in $(seq 30); do
        docker exec "$id" ctr version >/dev/null 2>&1 && break
        sleep 1
    done
    # Debian's ctr 1.6 has no `import --label`: pin (keep from the kubelet's image
    # garbage collection, as kind does) with `images label` afterwards.
    docker save "${images[@]}" | docker exec -i "$id" ctr -n k8s.io images import \
        --all-platforms --no-unpack --digests - >/dev/null
    for b in "${images[@]}"; do
        docker exec "$id" ctr -n k8s.io images label "docker.io/$b" io.cri-containerd.pinned=pinned >/dev/null 2>&1 ||
            docker exec "$id" ctr -n k8s.io images label "$b" io.cri-containerd.pinned=pinned >/dev/null
    done
    docker exec "$id" sh -c 'pkill containerd; sleep 1; rm -f /var/log/containerd-build.log'
    docker commit -c 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
        -c "LABEL pyproxy.inputs=$inputs" "$id" "$NODE_IMAGE" >/dev/null
}

fetch_rootfs() {
    rootfs "tools-$TOOLS_KEY" "$TOOLS_PACKAGES"
    rootfs "kindbase-$KINDBASE_KEY" "$KINDBASE_PACKAGES"
}

build_all() {
    engine_running || die "the engine does not run: hack/kind-offline.sh engine first"
    GO=$(find_go)
    local t0
    t0=$(now)
    # debootstrap waits on the network, the Go builds on the CPU: overlap them.
    local fetch_pid
    fetch_rootfs &
    fetch_pid=$!
    step "Go tools (kind $KIND_VERSION, crictl $CRICTL_VERSION, coredns $COREDNS_VERSION)" build_go_tools
    step "Kubernetes $K8S_VERSION binaries (hack/build-control-plane.sh --with-node)" build_kubernetes_node_binaries
    CP_BIN=$("$REPO_ROOT/hack/build-control-plane.sh" --print-bin-dir)
    step "pause (gcc -static)" build_pause
    step "debootstrap of the tools and kind base root filesystems" wait "$fetch_pid"
    step "Debian tools image $TOOLS_IMAGE (debootstrap)" build_tools_image
    step "offline Python base $PYTHON_IMAGE (wheels from PyPI on the host)" build_python_image
    step "agnhost and pod-network images" build_test_images
    step "component images (control plane, etcd, coredns, pause)" build_component_images
    step "kind base image $BASE_IMAGE (debootstrap + kind's images/base/files)" build_base_image
    step "node image $NODE_IMAGE" build_node_image
    log "kind-offline: all images ready in $(elapsed "$t0") s"
}

case "${1:-}" in
    engine) need_root; step "engine" engine_start ;;
    images) need_root; build_all ;;
    fetch) need_root; apt_install debootstrap; step "debootstrap of the root filesystems" fetch_rootfs ;;
    stop) need_root; engine_stop ;;
    status) if engine_running; then echo running; else echo stopped; exit 1; fi ;;
    *) die "usage: $0 engine|images|fetch|stop|status" ;;
esac
