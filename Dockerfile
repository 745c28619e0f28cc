# One image for every gfaas service; compose.yaml picks the service per container.
# CPU build by default. For GPU nodes build with a CUDA torch, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 \
#                --build-arg EXTRAS="[gpu]" .
# and run the container with the NVIDIA runtime (compose.yaml reserves the GPUs).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# "[gpu]" adds cupy and NVML bindings for the CUDA backends.
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY gfaas ./gfaas
COPY examples ./examples
RUN pip install --extra-index-url "${TORCH_INDEX}" torch \
 && pip install ".${EXTRAS}"

ENV GFAAS_STATE_DIR=/var/lib/gfaas
EXPOSE 8000
ENTRYPOINT ["gfaas"]
CMD ["up"]
