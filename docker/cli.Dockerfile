# syntax=docker/dockerfile:1.7
# A GitHub Copilot CLI backend for copilot-lb (there is no official image): the npm package
# @github/copilot, run headless on 0.0.0.0:4321 as a non-root user.
#
#   docker build -f docker/cli.Dockerfile -t copilot-cli:1.0.102 docker/    (context: docker/)
#
# Runtime environment (see docker/cli-entrypoint.sh):
#   COPILOT_CONNECTION_TOKEN or COPILOT_CONNECTION_TOKEN_FILE   required: the token every client
#       (that is, copilot-lb) must present in `connect`; copilot-lb reads it via token_env/token_file
#   COPILOT_GITHUB_TOKEN or COPILOT_GITHUB_TOKEN_FILE           optional: GitHub auth for the models
#       (apps may instead bring their own provider, BYOK, per session)
#   COPILOT_PORT (4321), COPILOT_HOST (0.0.0.0)
# Session state: $COPILOT_HOME/session-state = /home/copilot/.copilot/session-state. Mount ONE
# shared volume there on every backend (compose: session-state; k8s: a ReadWriteMany PVC) so
# copilot-lb can resume a session on another backend when its own dies.
FROM node:20-bookworm-slim

ARG COPILOT_CLI_VERSION=1.0.102
RUN npm install --global --no-audit --no-fund --loglevel=error "@github/copilot@${COPILOT_CLI_VERSION}" \
 && npm cache clean --force \
 && groupadd --system --gid 10002 copilot \
 && useradd --system --uid 10002 --gid copilot --create-home --home-dir /home/copilot \
            --shell /usr/sbin/nologin copilot \
 && mkdir -p /home/copilot/.copilot/session-state /home/copilot/work /opt/copilot-cache \
 && chown -R copilot:copilot /home/copilot /opt/copilot-cache

COPY --chmod=0755 cli-entrypoint.sh /usr/local/bin/copilot-cli-entrypoint

ENV HOME=/home/copilot \
    COPILOT_HOME=/home/copilot/.copilot \
    COPILOT_CACHE_HOME=/opt/copilot-cache \
    COPILOT_AUTO_UPDATE=false \
    NO_COLOR=1 \
    COPILOT_HOST=0.0.0.0 \
    COPILOT_PORT=4321
USER 10002:10002
WORKDIR /home/copilot/work
# The native launcher unpacks its package (~235 MB) into COPILOT_CACHE_HOME on first start: do it
# at build time so containers start fast and never race on it.
RUN copilot --version

EXPOSE 4321
VOLUME ["/home/copilot/.copilot/session-state"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["node", "-e", "require('net').connect(+process.env.COPILOT_PORT,'127.0.0.1').on('connect',()=>process.exit(0)).on('error',()=>process.exit(1))"]
ENTRYPOINT ["copilot-cli-entrypoint"]
