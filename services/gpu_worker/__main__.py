"""`python -m services.gpu_worker`: run the gpu-worker service alone."""

from services.gpu_worker.app import serve
from shared.config import settings_from_env
from shared.service import run_service

if __name__ == "__main__":
    run_service("gpu-worker", serve, settings_from_env())
