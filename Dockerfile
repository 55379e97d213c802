# vlembed, CPU image.
#   docker build -t vlembed .
#   docker run --rm -p 8080:8080 -v vlembed-hub:/data vlembed --model BAAI/BGE-VL-base
#
# The base images are build arguments (defaults: the public Docker Hub images),
# so a mirror, a pinned digest or a local stand-in can be used unchanged:
#   docker build --build-arg RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim@sha256:<digest> .
# scripts/container-smoke.sh builds this file with local stand-ins and checks it.
# HEALTHCHECK is part of the Docker image format (buildah/podman: --format docker).
# For NVIDIA GPUs use docker/Dockerfile.cuda.

# The Rust release the project is built and tested with (rustc 1.95).
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
# oneDNN from Debian (the `onednn` feature links libdnnl.so.2; see README,
# "CPU backends").
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libdnnl-dev \
    && rm -rf /var/lib/apt/lists/*
# Dependencies only, built from the manifests with empty sources: this layer
# is reused until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --features onednn --bin vlembed \
    && rm -rf src target/release/vlembed target/release/deps/vlembed-* \
        target/release/deps/libvlembed-* target/release/.fingerprint/vlembed-*
# The crate itself.
COPY . .
RUN cargo build --release --locked --features onednn --bin vlembed \
    && strip target/release/vlembed \
    && target/release/vlembed --version

FROM ${RUNTIME_IMAGE}
# oneDNN's runtime (libdnnl2 brings GNU OpenMP, libgomp1), the same Debian
# package the build stage linked.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libdnnl2 \
    && rm -rf /var/lib/apt/lists/*
# A numeric non-root user (Kubernetes' runAsNonRoot can verify it); /data is
# the Hugging Face Hub cache (HF_HOME), a volume so downloads persist.
RUN groupadd --system --gid 10001 vlembed \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin vlembed \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /src/target/release/vlembed /usr/local/bin/vlembed
USER 10001:10001
# OMP_WAIT_POLICY: oneDNN's OpenMP threads sleep as soon as a product ends
# instead of spinning on the cores the native kernels use next (README, "CPU
# backends").
ENV HF_HOME=/data \
    VLEMBED_HOST=0.0.0.0 \
    VLEMBED_PORT=8080 \
    OMP_WAIT_POLICY=passive
EXPOSE 8080
VOLUME ["/data"]
# vlembed is PID 1 and handles SIGTERM itself: /ready turns 503, in-flight
# requests finish (server.drain_delay_ms, server.shutdown_timeout_ms), exit 0.
STOPSIGNAL SIGTERM
# Healthy once every model is loaded (/ready), with no tool beyond bash; the
# start period covers a first model download.
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${VLEMBED_PORT:-8080} && printf 'GET /ready HTTP/1.0\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]
ENTRYPOINT ["/usr/local/bin/vlembed", "serve"]
