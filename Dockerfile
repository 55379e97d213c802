# vlembed, CPU image.
#   docker build -t vlembed .
#   docker run -p 8080:8080 -v $HOME/.cache/huggingface:/data vlembed --model BAAI/BGE-VL-base
# For NVIDIA GPUs use docker/Dockerfile.cuda.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin vlembed \
    && strip target/release/vlembed

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data vlembed \
    && mkdir -p /data && chown vlembed /data
COPY --from=build /src/target/release/vlembed /usr/local/bin/vlembed
COPY config/default.toml /etc/vlembed/default.toml
USER vlembed
ENV HF_HOME=/data \
    VLEMBED_HOST=0.0.0.0 \
    VLEMBED_PORT=8080
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/vlembed", "serve", "--config", "/etc/vlembed/default.toml"]
