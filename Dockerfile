# syntax=docker/dockerfile:1
#
# Rocket Learning Rewards: a multi-stage build.
#   docker build -t rocket-rewards .
#   docker run -p 8080:8080 -v rocket-data:/app/data \
#     -v "$PWD/secrets:/run/secrets:ro" \
#     -e ROCKET_ADMIN_TOKEN_FILE=/run/secrets/admin_token \
#     -e ROCKET_MOODLE_TOKEN_FILE=/run/secrets/moodle_token rocket-rewards
# Secrets are best kept as files in /run/secrets (ROCKET_SECRETS_DIR), one
# value per line, mode 600, owned by uid 10001 (or set
# ROCKET_SECRETS_ALLOW_SHARED=on where the platform cannot set modes): every
# secret variable NAME also reads the file NAME_FILE names, and a source file
# can say `secret: <name>` for /run/secrets/<name>. A changed file takes
# effect with SIGHUP or POST /api/admin/reload, without a restart (and by
# itself with ROCKET_WATCH_CONFIG=on). None are baked into the image.

# ---- builder ---------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, against a dummy crate, so that they stay in a cached
# layer until Cargo.toml or Cargo.lock changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src \
      target/release/rocket-rewards* \
      target/release/deps/rocket_rewards-* \
      target/release/deps/librocket_rewards-* \
      target/release/.fingerprint/rocket-rewards-*

# The real sources (migrations/ is embedded at compile time by sqlx::migrate!).
COPY . .
RUN cargo build --release --locked --bin rocket-rewards

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rocket \
 && useradd --system --uid 10001 --gid rocket --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin rocket

WORKDIR /app
COPY --from=builder /build/target/release/rocket-rewards /usr/local/bin/rocket-rewards
# Config is root-owned and read-only to the server; to change it, mount your
# own sources.d/ and rules/ over these and send SIGHUP (or POST /api/admin/reload).
COPY sources.d/ /app/sources.d/
COPY rules/ /app/rules/

# The SQLite database lives on a volume the server's user can write.
RUN mkdir -p /app/data && chown rocket:rocket /app/data
VOLUME ["/app/data"]

ENV ROCKET_LISTEN=0.0.0.0:8080 \
    ROCKET_DATABASE_URL=sqlite:///app/data/rocket.db \
    ROCKET_CONFIG_DIR=/app \
    ROCKET_SECRETS_DIR=/run/secrets

USER 10001:10001
EXPOSE 8080

# No HEALTHCHECK: the slim image has no curl/wget and the binary has no
# self-probe subcommand. Probe over HTTP from the orchestrator instead:
# liveness GET /health/live, readiness GET /health/ready (503 until ready).

ENTRYPOINT ["rocket-rewards"]
CMD ["serve"]
