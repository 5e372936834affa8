# pyproxy container image: kube-proxy's replacement, run by manifests/daemonset.yaml.
#
#   docker build -t pyproxy:dev .
#
# No `# syntax=` line: it would make BuildKit pull a frontend image from a registry,
# and the built-in frontend handles everything here (RUN --mount included).
#
# Offline (hack/kind-offline.sh, no registry): PYTHON_IMAGE names a local Debian
# bookworm base that already has the node tools and sets PIP_NO_INDEX/PIP_FIND_LINKS
# to wheels prepared on the host, and OS_PACKAGES=preinstalled skips apt-get (which
# needs the network); nothing in the build then reaches the network:
#   docker build --build-arg PYTHON_IMAGE=pyproxy-kind/python:3.11-offline \
#       --build-arg OS_PACKAGES=preinstalled -t pyproxy:dev .
#
# Stage 1 builds pyproxy's wheel; stage 2 is a slim Python with the kernel tools
# pyproxy drives and the wheel installed from PyPI-resolved binary wheels only.
# No compiler, no pip cache, no apt lists and no source tree end up in the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# "install" (default): apt-get the node tools below. "preinstalled": the base image
# already has them; the build checks that each tool is there instead.
ARG OS_PACKAGES=install

# ---- build: the wheel ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Only what the wheel is built from (see .dockerignore); setuptools comes from
# PyPI through pip's isolated build environment (pyproject.toml build-system).
COPY pyproject.toml README.md ./
COPY pyproxy ./pyproxy
RUN pip wheel --no-cache-dir --no-deps -w /dist .

# ---- final image ---------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG OS_PACKAGES

# Debian packages of the tools pyproxy runs on the node (hostNetwork):
#   iptables  iptables-{legacy,nft}{,-save,-restore}; pyproxy picks the variant the
#             host uses (--iptables-backend auto), like kube-proxy's image does
#   ipset     IPVS mode's sets          ipvsadm    IPVS inspection
#   conntrack stale UDP flow deletion   iproute2   ip addr/route (kube-ipvs0, node IPs)
#   kmod      modprobe ip_vs*, nf_conntrack (with the host's /lib/modules mounted)
#   nftables  nft: deletes kube-proxy's nftables-mode tables after taking over a node
# Versions are not pinned: the bookworm suite only receives security updates,
# which the image should pick up on rebuild.
# hadolint ignore=DL3008
RUN if [ "$OS_PACKAGES" = install ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends \
            conntrack \
            iproute2 \
            ipset \
            iptables \
            ipvsadm \
            kmod \
            nftables \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && for tool in conntrack ip ipset iptables-legacy iptables-nft ipvsadm modprobe nft; do \
        command -v "$tool" >/dev/null || { echo "missing $tool (OS_PACKAGES=$OS_PACKAGES)" >&2; exit 1; }; \
    done

# The wheel is bind-mounted from the build stage instead of copied, so it leaves
# no layer behind. Dependencies come from PyPI as binary wheels only
# (--only-binary): there is no compiler here, and none is wanted.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir --only-binary=:all: /dist/*.whl \
    && pyproxy --help >/dev/null

ENV PYTHONUNBUFFERED=1
# Root, like kube-proxy: the DaemonSet runs it privileged in the host network
# namespace to program iptables/IPVS (see manifests/daemonset.yaml).
ENTRYPOINT ["pyproxy"]
