# Lepton's server and CLI in a container: CPU PyTorch, a non-root user, HEALTHCHECK on /readyz. No model is baked
# in: the server reads its registry (LEPTON_DB_URL, or a file of it in LEPTON_DB_URL_FILE) or, as a KServe runtime,
# the bundle KServe mounts at /mnt/models. To bake a bundle in, build the `with-model` target:
#   docker build -t lepton .
#   docker build --target with-model --build-arg MODEL_BUNDLE=cxr.lepton -t lepton-cxr .
# Where the default torch wheel is a CUDA build, pass PyTorch's CPU wheel index:
#   docker build --build-arg TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>" -t lepton .

FROM python:3.11-slim AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_PIP_ARGS=""
# Extras baked in: batch inference on a Ray cluster (deploy/k8s/rayjob.yaml) needs ray too:
#   docker build --build-arg EXTRAS=postgres,redis,ray -t lepton .
ARG EXTRAS="postgres,redis"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/lepton \
    && /opt/lepton/bin/pip install --no-cache-dir $TORCH_PIP_ARGS "$TORCH_SPEC" \
    && /opt/lepton/bin/pip install --no-cache-dir ".[$EXTRAS]"

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 --user-group lepton \
    && mkdir -p /var/lib/lepton /mnt/models && chown lepton:lepton /var/lib/lepton
COPY --from=build /opt/lepton /opt/lepton
COPY deploy/docker/entrypoint.sh /usr/local/bin/lepton-entrypoint
ENV PATH=/opt/lepton/bin:$PATH \
    LEPTON_HOME=/var/lib/lepton \
    LEPTON_PORT=8080 \
    OMP_WAIT_POLICY=PASSIVE \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/lepton
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('LEPTON_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["lepton-entrypoint"]
CMD ["serve"]

# A bundle (`lepton models export`) baked in, served as MODEL_NAME; API keys from a mounted file:
#   docker run -v $PWD/keys:/run/secrets/lepton-keys:ro -e LEPTON_KEYS_FILE=/run/secrets/lepton-keys lepton-cxr
FROM runtime AS with-model
ARG MODEL_BUNDLE
ARG MODEL_NAME=model
ENV LEPTON_MODEL_NAME=$MODEL_NAME
COPY --chown=lepton:lepton ${MODEL_BUNDLE} /mnt/models/
CMD ["serve", "--model-dir", "/mnt/models"]

FROM runtime
