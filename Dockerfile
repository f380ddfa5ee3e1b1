# syntax=docker/dockerfile:1
# meshproxy: build the Cython extensions in one stage, run as a non-root user in a slim one.

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
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin meshproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels meshproxy \
 && rm -rf /wheels
COPY meshproxy/examples/edge.yaml /etc/meshproxy/mesh.yaml
USER 10001
EXPOSE 10000
ENTRYPOINT ["meshproxy", "run"]
CMD ["--config", "/etc/meshproxy/mesh.yaml"]
