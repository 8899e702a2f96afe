# The data-plane images, from one build of `apiward-sidecar`:
#   docker build -f images/sidecar.Dockerfile --target sidecar -t ghcr.io/apiward/apiward-sidecar:0.1.0 .
#   docker build -f images/sidecar.Dockerfile --target init    -t ghcr.io/apiward/apiward-init:0.1.0 .
# sidecar: distroless/cc, UID 1337 (the UID the interception rules skip), no shell.
# init: Debian slim with iptables, for `apiward-sidecar init` (runs once, as root with
# NET_ADMIN/NET_RAW only, before the pod's other containers).
# Both for linux/amd64 and linux/arm64 (docker buildx build --platform linux/amd64,linux/arm64).
FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile dist -p apiward-sidecar --bin apiward-sidecar \
 && cp target/dist/apiward-sidecar /apiward-sidecar

FROM docker.io/library/debian:bookworm-slim AS init
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*
COPY --from=build /apiward-sidecar /usr/local/bin/apiward-sidecar
ENTRYPOINT ["/usr/local/bin/apiward-sidecar"]
CMD ["init", "--help"]

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /apiward-sidecar /usr/local/bin/apiward-sidecar
USER 1337:1337
EXPOSE 15006 15001 15020
ENTRYPOINT ["/usr/local/bin/apiward-sidecar"]
CMD ["run"]
