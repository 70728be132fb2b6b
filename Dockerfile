# rollgate-proxy container image: a static musl binary on `scratch`, non-root, about 9 MB.
#
# From source (needs BuildKit, the default builder since Docker 23):
#   docker build -t rollgate-proxy .
# From a binary built on the host (what ./scripts/test-container.sh builds, runs and checks):
#   cargo build --locked --profile container --target x86_64-unknown-linux-musl \
#     -p rollgate-proxy-server --bin rollgate-proxy
#   scripts/container-rootfs.sh \
#     target/x86_64-unknown-linux-musl/container/rollgate-proxy target/container/rootfs
#   docker build --build-arg ROOTFS=prebuilt -t rollgate-proxy .
# Run (upstream mode; the snapshot survives restarts in the volume):
#   docker run -d -p 3001:3001 -e ROLLGATE_API_KEY -v rollgate-proxy-data:/data rollgate-proxy
# Configuration is by environment, as every flag in `rollgate-proxy --help` (README).

# Where the image's files come from: `source` (compile here) or `prebuilt` (the host's build).
ARG ROOTFS=source

FROM rust:1.95-bookworm AS source
WORKDIR /src
COPY . .
# musl-gcc compiles ring's C for the musl target.
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
# rust-toolchain.toml pins the toolchain; the musl target makes the binary static (no libc).
RUN rustup target add x86_64-unknown-linux-musl \
 && CC_x86_64_unknown_linux_musl=musl-gcc \
    cargo build --locked --profile container --target x86_64-unknown-linux-musl \
      -p rollgate-proxy-server --bin rollgate-proxy \
 && scripts/container-rootfs.sh \
      target/x86_64-unknown-linux-musl/container/rollgate-proxy /out/rootfs

FROM scratch AS prebuilt
COPY target/container/rootfs/ /out/rootfs/

FROM ${ROOTFS} AS rootfs

FROM scratch AS runtime
COPY --from=rootfs /out/rootfs/root/ /
# The snapshot directory belongs to the proxy's user, so a fresh named volume does too.
COPY --from=rootfs --chown=65532:65532 /out/rootfs/data /data
# The shutdown bound stays below `docker stop`'s default 10 s grace, so a stop never SIGKILLs.
ENV PORT=3001 \
    ROLLGATE_PROXY_BIND=0.0.0.0 \
    ROLLGATE_BASE_URL=https://api.rollgate.io \
    ROLLGATE_PROXY_SNAPSHOT_FILE=/data/snapshot.json \
    ROLLGATE_PROXY_FLAGS_FILE=/etc/rollgate-proxy/flags.json \
    ROLLGATE_PROXY_SHUTDOWN_TIMEOUT=8s
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 3001
STOPSIGNAL SIGTERM
# `healthcheck` asks /ready on $PORT and exits 0/1: no shell or wget in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/rollgate-proxy", "healthcheck"]
ENTRYPOINT ["/rollgate-proxy"]
