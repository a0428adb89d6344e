# policy-agent image: the agent (`policy-agent`), the CNI node daemon (`vpcip-ipamd`)
# and the CNI installer (`python -m cni_shim.install`), which builds the stdlib-only
# `vpcip-cni` executable for the host from the same sources.
#
#   docker build -t registry.example.com/policy-agent:0.1.0 .
#
# The base is pinned by its full tag (a Python patch release on Debian 12); both stages
# use the same one, so the virtualenv's interpreter path is valid in the final stage.
# BASE is the one switch between the two routes: the default above for docker with a
# registry, or a Debian bookworm root file system built by mmdebstrap (Debian's python3
# with `python` and venv support) where no image registry is reachable:
#   scripts/build-images.sh  (buildah bud --build-arg BASE=localhost/policy-agent-base:bookworm)
ARG BASE=python:3.11.11-slim-bookworm

# --- build: install the project into a venv; pip and the build tools stay in this stage.
# Every runtime dependency ships a wheel (python-iptables, the one that needed a C
# compiler, is a benchmark-only extra now), so no compiler is installed anywhere.
FROM ${BASE} AS build
# The index settings of the machine that builds (passed by scripts/build-images.sh from
# its own pip configuration; unset, and ignored by pip when empty, in the docker route).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG PIP_CONSTRAINT
ARG PIP_DEFAULT_TIMEOUT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY policy_agent ./policy_agent
COPY cni_shim ./cni_shim
# A venv without pip: the image carries the project and its runtime dependencies only
# (no pip, no setuptools, no test extras). pip runs from a throwaway venv of this stage
# (ensurepip, offline), so a base without a system pip (Debian's python3) works too.
RUN python -m venv --without-pip /opt/policy-agent \
 && python -m venv /tmp/pip \
 && /tmp/pip/bin/pip --python /opt/policy-agent/bin/python install --no-compile . \
 && rm -rf /tmp/pip \
 && find /opt/policy-agent -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime ------------------------------------------------------------------------
FROM ${BASE}
# iptables (both the nft and the legacy backend: the agent follows the host's),
# ipset, iproute2. --no-install-recommends keeps out everything else.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/policy-agent /opt/policy-agent
ENV PATH=/opt/policy-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="policy-agent" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy node agent with the vpcip CNI" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# Root, on purpose: iptables, ipset and netlink changes in the host network namespace
# need uid 0 with NET_ADMIN/NET_RAW, and the CNI installer writes root-owned host
# directories. The manifests drop every other capability, make the root file system
# read-only and never run the agent privileged.
USER 0:0
CMD ["policy-agent", "--help"]
