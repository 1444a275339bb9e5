# syntax=docker/dockerfile:1
#
# The egress-gateway image: the one binary on a distroless, non-root base.
#
#   docker build -t egress-gateway:0.1.0 .
#
# The same image runs the gateway (`run`, the default command) and the sidecar
# (`sidecar ...`); it has no shell, so health checks are HTTP probes on the admin port.

# --- build ------------------------------------------------------------------------
# Debian bookworm to match the runtime's glibc (distroless cc-debian12).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest even to build one package.
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is copied
# out of the cached target dir because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p egress-gateway --bin egress-gateway \
 && install -D -m 0755 target/release/egress-gateway /out/egress-gateway

# --- runtime ----------------------------------------------------------------------
# glibc, libgcc, CA certificates and tzdata; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/egress-gateway /usr/local/bin/egress-gateway
# 65532 is distroless' `nonroot`; numeric so Kubernetes can check runAsNonRoot.
USER 65532:65532
# 8443: the mTLS proxy listener. 9901: admin (/healthz, /readyz, /metrics).
# 15001/15021: the sidecar's proxy and admin ports when run as `sidecar`.
EXPOSE 8443 9901
ENTRYPOINT ["/usr/local/bin/egress-gateway"]
CMD ["run", "--config", "/etc/egress-gateway/gateway.yaml"]
