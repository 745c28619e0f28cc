# One image for every gfaas service; compose.yaml picks the service per container.
#
# Two variants, chosen by the VARIANT build argument (compose.yaml's profiles set it):
#   cpu (default)  torch's CPU wheel: starts anywhere, laptops included.
#   gpu            torch's CUDA wheel (TORCH_CUDA, from the PyTorch index) plus the
#                  `[gpu]` extra (cupy-cuda12x with its CUDA libraries from PyPI, NVML
#                  bindings); run it with the NVIDIA container runtime and reserved GPUs
#                  (the gpu profile does). The CUDA user-space libraries come in the
#                  wheels; the driver comes from the host.
#   docker build -t gfaas:cpu .
#   docker build -t gfaas:gpu --build-arg VARIANT=gpu .
#
# Dependencies are installed from pyproject.toml (and constraints.txt) before any source
# is copied, so editing the code rebuilds only the last layers. It runs as user gfaas
# (uid 10001), not root.
ARG VARIANT=cpu

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GFAAS_STATE_DIR=/var/lib/gfaas
RUN useradd --create-home --uid 10001 --user-group gfaas \
 && mkdir -p /var/lib/gfaas /etc/gfaas/auth \
 && chown gfaas:gfaas /var/lib/gfaas /etc/gfaas/auth \
 && chmod 0700 /etc/gfaas/auth
WORKDIR /app
COPY pyproject.toml constraints.txt ./
# requirements.txt: the project's dependencies (and the named extras'), torch apart:
# each variant installs torch from its own index.
RUN python -c "import sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = p['dependencies'] + [d for e in sys.argv[1:] for d in p['optional-dependencies'][e]]; \
print('\n'.join(d for d in deps if not d.startswith('torch')))" > requirements.txt \
 && python -c "import sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['optional-dependencies']['gpu']))" > requirements-gpu.txt

FROM base AS deps-cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch \
 && pip install -c constraints.txt -r requirements.txt

FROM base AS deps-gpu
# A CUDA 12 build of torch (cupy-cuda12x matches it); the host's driver must support it.
ARG TORCH_CUDA=cu128
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" torch \
 && pip install -r requirements.txt -r requirements-gpu.txt "cupy-cuda12x[ctk]" \
 && python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'"

# The variant's dependencies, then the source (the layers a code change rebuilds).
FROM deps-${VARIANT} AS app
COPY README.md ./
COPY shared ./shared
COPY services ./services
COPY gfaas ./gfaas
COPY examples ./examples
RUN pip install --no-deps . && rm -rf build *.egg-info
USER gfaas
EXPOSE 8000 8001 8002 8003 8004 8005
ENTRYPOINT ["gfaas"]
CMD ["up"]
