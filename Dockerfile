# fleetpick, the ext_proc endpoint picker, in one small image: the shipped crate only (the lab's
# simulator image is Dockerfile.lab). Build: docker build -t fleetpick .   Run: see
# envoy/docker-compose.yml and examples/k8s/fleetpick.yaml.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The symbol table stays in the binary (profiles and backtraces name functions); the line tables
# go to fleetpick.debug, left in this stage for whoever needs file and line.
RUN cargo build --release --locked -p fleetpick --bin fleetpick \
 && cd target/release \
 && objcopy --only-keep-debug fleetpick fleetpick.debug \
 && strip --strip-debug fleetpick \
 && objcopy --add-gnu-debuglink=fleetpick.debug fleetpick

FROM debian:bookworm-slim
# No shell tools are needed at run time: `fleetpick probe URL` is the health check.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fleetpick
COPY --from=build /src/target/release/fleetpick /usr/local/bin/fleetpick
USER 10001:10001
# ext_proc gRPC, metrics/health.
EXPOSE 9002 9090
ENTRYPOINT ["fleetpick"]
CMD ["serve", "--config", "/etc/fleetpick/fleet.yaml"]
