# The operator image: `apiward operator` (also the CLI: check, explain, crds, inventory).
# Built from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/apiward/apiward:0.1.0 .
# Multi-stage: a Rust build stage, then distroless/cc (glibc, CA roots, no shell, no
# package manager) running as the nonroot user (65532). The binary is built without the
# demo feature, so the data plane is not linked in.
FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile dist -p apiward --no-default-features --features otlp --bin apiward \
 && cp target/dist/apiward /apiward

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /apiward /usr/local/bin/apiward
USER 65532:65532
EXPOSE 15012 9443 8080
ENTRYPOINT ["/usr/local/bin/apiward"]
CMD ["operator"]
