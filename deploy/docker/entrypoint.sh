#!/bin/sh
# Lepton's container entrypoint. With no arguments, or options only, it runs `lepton serve` on
# $LEPTON_HOST:$LEPTON_PORT (0.0.0.0:8080); any other first argument is a lepton command (`train`, `models`, ...).
#
#   LEPTON_DB_URL / LEPTON_DB_URL_FILE        the registry database URL, or a file holding it (a mounted secret)
#   LEPTON_REDIS_URL / LEPTON_REDIS_URL_FILE  Redis for rate limits and reloads shared by replicas (optional)
#   LEPTON_MODELS                             registry references to serve, comma-separated (cxr@production,...)
#   LEPTON_KEYS_FILE                          API keys for --model-dir (KServe) serving: TENANT SCOPE KEY lines
#   LEPTON_MODEL_NAME                         the name a --model-dir bundle is served as, unless --model-name is given
#   LEPTON_HOME                               artifacts of a database registry (a shared volume across replicas)
set -eu

for var in LEPTON_DB_URL LEPTON_REDIS_URL; do
  file=$(printenv "${var}_FILE" || true)
  if [ -n "$file" ]; then
    if [ ! -r "$file" ]; then
      echo "lepton-entrypoint: ${var}_FILE=$file is not a readable file (mount the secret there)" >&2
      exit 64
    fi
    value=$(cat "$file")
    export "$var=$value"
  fi
done

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- serve "$@"
fi

if [ "$1" = serve ]; then
  shift
  model_dir=no
  model_name=no
  for arg in "$@"; do
    case "$arg" in
      --model-dir|--model-dir=*|--model_dir|--model_dir=*) model_dir=yes ;;
      --model-name|--model-name=*|--model_name|--model_name=*) model_name=yes ;;
    esac
  done
  if [ "$model_dir" = yes ]; then
    if [ -n "${LEPTON_KEYS_FILE:-}" ]; then
      set -- --keys-file "$LEPTON_KEYS_FILE" "$@"
    fi
    if [ "$model_name" = no ] && [ -n "${LEPTON_MODEL_NAME:-}" ]; then
      set -- --model-name "$LEPTON_MODEL_NAME" "$@"
    fi
  else
    models=${LEPTON_MODELS:-}
    if [ -z "$models" ] && ! printf '%s\n' "$@" | grep -q -- '^--model'; then
      echo "lepton-entrypoint: nothing to serve: set LEPTON_MODELS (e.g. cxr@production) or pass --model" >&2
      exit 64
    fi
    old_ifs=$IFS
    IFS=,
    for ref in $models; do
      IFS=$old_ifs
      [ -n "$ref" ] && set -- --model "$ref" "$@"
    done
    IFS=$old_ifs
  fi
  # Defaults first: options given to the container come later and win.
  exec lepton serve --host "${LEPTON_HOST:-0.0.0.0}" --port "${LEPTON_PORT:-8080}" "$@"
fi

exec lepton "$@"
