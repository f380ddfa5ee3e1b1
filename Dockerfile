# syntax=docker/dockerfile:1
# meshproxy: build the Cython extensions in one stage, run as a non-root user in a slim one.
# The user is UID/GID 1337, the proxy identity `meshproxy iptables` exempts by default, so
# the same image is both a sidecar (`run --sidecar ...`) and its init step, run as root with
# NET_ADMIN in the workload's network namespace:
#   docker run --rm --user 0 --cap-add NET_ADMIN --network container:APP \
#       --entrypoint meshproxy IMAGE iptables

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY meshproxy ./meshproxy
# One wheel for meshproxy (compiled _core and fast path) plus wheels of its dependencies.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# iptables (the nft backend, Debian 12's default): what `meshproxy iptables` runs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 meshproxy \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin \
        meshproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels meshproxy \
 && rm -rf /wheels
COPY meshproxy/examples/edge.yaml /etc/meshproxy/mesh.yaml
USER 1337
EXPOSE 10000
ENTRYPOINT ["meshproxy", "run"]
CMD ["--config", "/etc/meshproxy/mesh.yaml"]
