# fleetpick: the ext_proc endpoint picker, and its simulator (`fleetpick sim`), in one small
# image. Build: docker build -t fleetpick .   Run: see envoy/docker-compose.yml and
# examples/k8s/fleetpick.yaml.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin fleetpick \
 && strip target/release/fleetpick

FROM debian:bookworm-slim
# No shell tools are needed at run time: `fleetpick probe URL` is the health check.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fleetpick
COPY --from=build /src/target/release/fleetpick /usr/local/bin/fleetpick
USER 10001:10001
# ext_proc gRPC, metrics/health.
EXPOSE 9002 9090
ENTRYPOINT ["fleetpick"]
CMD ["serve", "--config", "/etc/fleetpick/fleet.yaml"]
