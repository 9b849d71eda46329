#!/usr/bin/env bash
# The training image's entrypoint: `docker run IMAGE train base run.name=b1` runs `unimo train base run.name=b1`;
# a command that is not one of unimo's (`bash`, `ray start ...`, which `ray up` and KubeRay pass) runs as given.
set -e
case "${1:-}" in
  ""|-*|train|demo|config|model|data|submit|jobs|job|export|mlflow|check|eval)
    exec unimo "$@" ;;
  *)
    exec "$@" ;;
esac
